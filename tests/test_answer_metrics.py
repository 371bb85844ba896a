"""XOR-Full answer metrics against hand computations and against the official script's own output.

Every expected number below was first worked out by hand from the official `evals/eval_xor_full.py` (XORQA repo,
commit c894f52), then checked against that script run on the same fixture (see OFFICIAL_* below).
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from umr_jax import answer_metrics as am

FMIN = sys.float_info.min  # what nltk's unsmoothed BLEU puts in for an n-gram order with no match

# The fixture: XOR-Full gold records (3002 has a bare-string answer) and predictions keyed as a reader might
# write them ("fi_1001": the official script keeps only the text after the last "_"). 3001 has no prediction.
GOLD = [
    {"id": "1001", "lang": "fi", "question": "q", "answers": ["Helsinki"]},
    {"id": "1002", "lang": "fi", "question": "q", "answers": ["Turku", "Åbo"]},
    {"id": "2001", "lang": "ja", "question": "q", "answers": ["徳川家康・秀忠", "家康"]},
    {"id": "2002", "lang": "ja", "question": "q", "answers": ["1964年"]},
    {"id": "3001", "lang": "ru", "question": "q", "answers": ["Москва"]},
    {"id": "3002", "lang": "ru", "question": "q", "answers": "Санкт-Петербург"},
    {"id": "4001", "lang": "ko", "question": "q", "answers": ["1950년", "한국 전쟁"]},
    {"id": "5001", "lang": "ar", "question": "q", "answers": ["القاهرة"]},
]
PREDICTIONS = {
    "fi_1001": "helsinki.",
    "1002": "Åbo",
    "ja_2001": "徳川家康、秀忠",
    "2002": "1964年",
    "3002": "Санкт Петербург",
    "ko_4001": "1950년 6월",
    "5001": "القاهرة",
}

# Hand computation, per question: (id, F1, EM, BLEU). BLEU is nltk sentence_bleu on *characters* (BLEU-4,
# p_n = clipped n-gram matches / hypothesis n-grams, BP = 1 if hyp_len > closest ref_len else exp(1 - r/c)).
HAND_EXAMPLES = [
    # 1001 fi: "helsinki." -> "helsinki" == "helsinki": F1 1, EM 1.
    #   BLEU, hyp "helsinki." (9 chars) vs "Helsinki" (8; "h" != "H", "." unmatched):
    #   p1 = 7/9, p2 = 6/8 (el ls si in nk ki), p3 = 5/7, p4 = 4/6; BP = 1 (9 > 8)
    #   -> (7/9 * 6/8 * 5/7 * 4/6)^(1/4) = (5/18)^(1/4) = 0.72598
    ("1001", 1.0, 1.0, (5 / 18) ** 0.25),
    # 1002 fi: "åbo" == "åbo" on the second gold: F1 1, EM 1 (max over golds; "turku" gives 0).
    #   BLEU, hyp "Åbo" (3 chars): p1 = p2 = p3 = 1, no 4-gram -> p4 = 0/1 -> FMIN; closest ref "Åbo" (3), BP = 1
    #   -> exp(0.25 * ln FMIN) = FMIN^(1/4) ~ 1.2e-77, not 0.
    ("1002", 1.0, 1.0, FMIN**0.25),
    # 2001 ja: pred "徳川家康、秀忠" -> "、"->"," -> MeCab "徳川 家康 , 秀忠 \n" -> normalised [徳川, 家康, 秀忠].
    #   gold 1 -> "徳川 家康 ・ 秀忠 \n" -> [徳川, 家康, ・, 秀忠] ("・" is not ASCII punctuation):
    #     common 3, P = 3/3, R = 3/4 -> F1 = 2 * 1 * 0.75 / 1.75 = 6/7.
    #   gold 2 -> [家康]: common 1, P = 1/3, R = 1 -> F1 = 1/2. Max F1 = 6/7; EM 0.
    #   BLEU, raw hyp "徳川家康、秀忠" (7 chars) vs the MeCab strings "徳川 家康 ・ 秀忠 \n" (12) and "家康 \n" (4):
    #   p1 = 6/7 ("、" unmatched), p2 = 3/6 (徳川 家康 秀忠), p3 = p4 = 0 -> FMIN (every ref trigram has a space);
    #   closest ref length 4 < 7 -> BP 1 -> (6/7 * 1/2)^(1/4) * FMIN^(1/2) ~ 1.2e-154.
    ("2001", 6 / 7, 0.0, (6 / 7 * 1 / 2) ** 0.25 * FMIN**0.5),
    # 2002 ja: both sides -> "1964 年 \n" -> "年" deleted -> "1964": F1 1, EM 1.
    #   BLEU, raw hyp "1964年" (5 chars) vs reference "1964 年 \n" (8 chars):
    #   p1 = 5/5, p2 = 3/4 (19 96 64; "4年" not in ref), p3 = 2/3 (196 964), p4 = 1/2 (1964);
    #   BP = exp(1 - 8/5) = exp(-0.6) -> exp(-0.6) * (1/4)^(1/4) = 0.38807
    ("2002", 1.0, 1.0, math.exp(-0.6) * 0.25**0.25),
    # 3002 ru: gold "Санкт-Петербург" (a bare string) -> "-" removed -> one token "санктпетербург";
    #   pred -> [санкт, петербург]: nothing shared -> F1 0, EM 0.
    #   BLEU, 15 chars each, only " " vs "-" differ: p1 = 14/15, p2 = 12/14, p3 = 10/13, p4 = 8/12; BP = 1
    #   -> (14*12*10*8 / (15*14*13*12))^(1/4) = (16/39)^(1/4) = 0.80032
    ("3002", 0.0, 0.0, (16 / 39) ** 0.25),
    # 4001 ko: pred -> "년" deleted -> [1950, 6월]; gold 1 -> [1950]: P = 1/2, R = 1 -> F1 2/3; gold 2: 0. EM 0.
    #   BLEU, hyp "1950년 6월" (8 chars), refs "1950년", "한국 전쟁" (5 each, " " matched from the 2nd):
    #   p1 = 6/8, p2 = 4/7, p3 = 3/6, p4 = 2/5; BP = 1 (8 > 5) -> (144/1680)^(1/4) = (3/35)^(1/4) = 0.54108
    ("4001", 2 / 3, 0.0, (3 / 35) ** 0.25),
    # 5001 ar: identical strings: F1 1, EM 1, BLEU 1.
    ("5001", 1.0, 1.0, 1.0),
]

# Per language, hand: the sums above over the language's questions / its count (3001 adds 0 to ru, counts 1).
HAND_PER_LANGUAGE = {
    "fi": (2, 1.0, 1.0, ((5 / 18) ** 0.25 + FMIN**0.25) / 2),  # BLEU (0.72598 + 1e-77) / 2 = 0.36299
    "ja": (2, (6 / 7 + 1) / 2, 0.5, ((3 / 7) ** 0.25 * FMIN**0.5 + math.exp(-0.6) * 0.25**0.25) / 2),  # F1 13/14
    "ru": (2, 0.0, 0.0, (16 / 39) ** 0.25 / 2),  # BLEU 0.80032 / 2 = 0.40016
    "ko": (1, 2 / 3, 0.0, (3 / 35) ** 0.25),
    "ar": (1, 1.0, 1.0, 1.0),
}
# Macro, hand: sum over the 5 languages / 7 (the official fixed XOR-Full denominator).
#   F1 = (1 + 13/14 + 0 + 2/3 + 1) / 7 = 0.513605; EM = (1 + 0.5 + 0 + 0 + 1) / 7 = 2.5/7 = 0.357143;
#   BLEU = (0.36299 + 0.19403 + 0.40016 + 0.54108 + 1) / 7 = 0.356895
HAND_MACRO = {
    "f1": (1 + 13 / 14 + 0 + 2 / 3 + 1) / 7,
    "em": 2.5 / 7,
    "bleu": sum(scores[3] for scores in HAND_PER_LANGUAGE.values()) / 7,
}

# The official script's output on this fixture. Obtained by copying evals/eval_xor_full.py unchanged to /tmp,
# with mecab-python3==1.0.12, unidic-lite==1.0.8, nltk==3.10.4, jsonlines==4.0.0 in a separate venv, writing GOLD
# and PREDICTIONS to files, and running its main() (printed averages) and calculate_f1_em_bleu() (per language;
# per question by calling it on one record at a time), printing repr() of each value.
OFFICIAL_EXAMPLES = {
    "1001": (1.0, 1.0, 0.7259795291154771),
    "1002": (1.0, 1.0, 1.2213386697554703e-77),
    "2001": (0.8571428571428571, 0.0, 1.2069187085583323e-154),
    "2002": (1.0, 1.0, 0.3880684294761699),
    "3002": (0.0, 0.0, 0.8003203203844999),
    "4001": (0.6666666666666666, 0.0, 0.5410822690539396),
    "5001": (1.0, 1.0, 1.0),
}
OFFICIAL_PER_LANGUAGE = {  # lang: (count, f1, em, bleu)
    "fi": (2, 1.0, 1.0, 0.36298976455773857),
    "ja": (2, 0.9285714285714286, 0.5, 0.19403421473808494),
    "ru": (2, 0.0, 0.0, 0.4001601601922499),
    "ar": (1, 1.0, 1.0, 1.0),
    "ko": (1, 0.6666666666666666, 0.0, 0.5410822690539396),
}
OFFICIAL_PRINTED_AVERAGES = {  # "avg f1: ...", "avg em: ...", "avg bleu: ..." (percent)
    "f1": 51.36054421768708,
    "em": 35.714285714285715,
    "bleu": 35.68952012202875,
}

_GOLD_BY_ID = {record["id"]: record for record in GOLD}


def _approx(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=0.0)


@pytest.mark.parametrize(("q_id", "f1", "em", "bleu"), HAND_EXAMPLES, ids=[row[0] for row in HAND_EXAMPLES])
def test_per_example_scores_match_hand_and_official(q_id: str, f1: float, em: float, bleu: float) -> None:
    record = _GOLD_BY_ID[q_id]
    prediction = am.normalize_prediction_ids(PREDICTIONS)[q_id]
    scores = am.score_example(prediction, record["answers"], record["lang"])
    assert (scores.f1, scores.em) == (_approx(f1), em)
    assert scores.bleu == _approx(bleu)
    assert (scores.f1, scores.em, scores.bleu) == tuple(_approx(v) for v in OFFICIAL_EXAMPLES[q_id])
    assert am.squad_f1_em(prediction, record["answers"], record["lang"]) == (_approx(f1), em)
    assert am.answer_bleu(prediction, record["answers"], record["lang"]) == _approx(bleu)


def test_hand_and_official_constants_agree() -> None:
    # Guards the constants themselves: a typo in either table fails here, not only in the implementation tests.
    for q_id, f1, em, bleu in HAND_EXAMPLES:
        assert OFFICIAL_EXAMPLES[q_id] == (_approx(f1), em, _approx(bleu))
    assert set(HAND_PER_LANGUAGE) == set(OFFICIAL_PER_LANGUAGE)
    for lang, (count, f1, em, bleu) in HAND_PER_LANGUAGE.items():
        assert OFFICIAL_PER_LANGUAGE[lang] == (count, _approx(f1), em, _approx(bleu))
    for key, value in HAND_MACRO.items():
        assert OFFICIAL_PRINTED_AVERAGES[key] == _approx(value * 100)


def test_per_language_and_macro_match_hand_and_official() -> None:
    per_language = am.per_language_scores(GOLD, am.normalize_prediction_ids(PREDICTIONS))
    assert set(per_language) == set(HAND_PER_LANGUAGE)
    for lang, (count, f1, em, bleu) in HAND_PER_LANGUAGE.items():
        got = per_language[lang]
        assert got.count == count
        assert (got.f1, got.em, got.bleu) == (_approx(f1), _approx(em), _approx(bleu))
        assert (got.count, got.f1, got.em, got.bleu) == tuple(
            v if isinstance(v, int) else _approx(v) for v in OFFICIAL_PER_LANGUAGE[lang]
        )
    macro = am.macro_average(per_language)
    assert macro == {key: _approx(value) for key, value in HAND_MACRO.items()}
    assert {key: value * 100 for key, value in macro.items()} == {
        key: _approx(value) for key, value in OFFICIAL_PRINTED_AVERAGES.items()
    }
    # A plain mean over the 5 languages present differs from the official /7: F1 = 3.595238 / 5.
    assert am.macro_average(per_language, num_languages=None)["f1"] == _approx((1 + 13 / 14 + 2 / 3 + 1) / 5)


def test_evaluate_files_rewrites_prediction_ids(tmp_path) -> None:
    gold_path, pred_path = tmp_path / "gold.jsonl", tmp_path / "pred.json"
    gold_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOLD), encoding="utf-8")
    pred_path.write_text(json.dumps(PREDICTIONS, ensure_ascii=False), encoding="utf-8")
    assert am.load_predictions(str(pred_path))["1001"] == "helsinki."
    result = am.evaluate_xor_full(str(gold_path), str(pred_path))
    assert result["macro"] == {key: _approx(value) for key, value in HAND_MACRO.items()}
    # Without the id rewrite "fi_1001", "ja_2001" and "ko_4001" would be missing: ko would score 0.
    raw = am.per_language_scores(GOLD, PREDICTIONS)
    assert raw["ko"].f1 == 0.0 and result["per_language"]["ko"].f1 == _approx(2 / 3)


def test_normalize_answer_follows_official_not_squad() -> None:
    assert am.normalize_answer("The  Beatles!") == "the beatles"  # no article removal, unlike SQuAD
    assert am.normalize_answer("Санкт-Петербург") == "санктпетербург"  # ASCII "-" removed, tokens join
    assert am.normalize_answer("東京。「タワー」") == "東京。「タワー」"  # non-ASCII punctuation kept
    assert am.normalize_answer("中国人 20歳 2020년 1964年") == "中国 20 2020 1964"  # counters deleted in any language


# F1/EM by hand (comments); BLEU is the official script's `bleu(final_gts, pred)` on the same inputs (same venv as
# OFFICIAL_* above; those outputs equal the F1/EM written here too).
@pytest.mark.parametrize(
    ("prediction", "golds", "lang", "expected", "official_bleu"),
    [
        # en: "the" is a token: pred [the, beatles], gold [beatles] -> P 1/2, R 1 -> F1 2/3, EM 0.
        ("The Beatles", ["Beatles"], "en", (2 / 3, 0.0), 0.5706745777055999),
        # de: max over golds picks the 2nd: [berlin] vs [berlin, mitte] -> P 1, R 1/2 -> 2/3.
        ("Berlin", ["Hamburg", "Berlin-Mitte", "Berlin Mitte"], "de", (2 / 3, 0.0), 0.846481724890614),
        # zh: no segmentation, one token each: "北京市" vs "北京" share nothing -> 0, no character-level credit.
        ("北京市", ["北京"], "zh", (0.0, 0.0), 1.133422688662942e-154),
        # zh: the counter "人" is deleted in zh too -> "中国" == "中国".
        ("中国人", ["中国"], "zh", (1.0, 1.0), 1.133422688662942e-154),
        # th: one token each, "กรุงเทพ" vs "กรุงเทพมหานคร" -> 0.
        ("กรุงเทพ", ["กรุงเทพมหานคร"], "th", (0.0, 0.0), 0.42437284567694994),
        # ja: "アメリカ合衆国" -> MeCab [アメリカ, 合衆, 国]; gold "アメリカ" -> [アメリカ]: P 1/3, R 1 -> F1 1/2.
        ("アメリカ合衆国", ["アメリカ"], "ja", (0.5, 0.0), 0.41113361690051975),
        # Both empty after normalisation: F1 0 (num_same == 0), EM 1 ("" == "").
        ("...", ["!"], "en", (0.0, 1.0), 0.0),
    ],
)
def test_squad_f1_em_languages(
    prediction: str, golds: list[str], lang: str, expected: tuple[float, float], official_bleu: float
) -> None:
    f1, em = am.squad_f1_em(prediction, golds, lang)
    assert (f1, em) == (_approx(expected[0]), expected[1])
    assert am.answer_bleu(prediction, golds, lang) == _approx(official_bleu)


def test_mecab_wakati_keeps_raw_mecab_format() -> None:
    # MeCab.Tagger("-Owakati").parse("1964年") returns "1964 年 \n"; the official BLEU counts those 8 characters.
    assert am.mecab_wakati("1964年") == "1964 年 \n"
    assert am.mecab_wakati("") == "\n"


def test_no_bleu_credit_without_character_overlap() -> None:
    assert am.answer_bleu("xyz", ["Москва"], "ru") == 0.0  # p1 numerator 0 -> nltk returns exactly 0
    assert am.answer_bleu("", ["Москва"], "ru") == 0.0


def test_empty_gold_list_raises_like_official_max() -> None:
    with pytest.raises(ValueError):
        am.squad_f1_em("x", [], "en")


def test_missing_japanese_tokenizer_names_the_package(monkeypatch) -> None:
    am._wakati_tagger.cache_clear()
    monkeypatch.setitem(sys.modules, "fugashi", None)  # makes `import fugashi` raise ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install fugashi==1\.5\.2 unidic-lite==1\.0\.8"):
            am.squad_f1_em("東京", ["東京"], "ja")
        assert am.squad_f1_em("Tokyo", ["tokyo"], "en") == (1.0, 1.0)  # other languages never need MeCab
    finally:
        am._wakati_tagger.cache_clear()
