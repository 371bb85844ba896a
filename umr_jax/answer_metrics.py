"""XOR-Full answer metrics (F1, EM, BLEU per language and their macro average), as the official script computes them.

The reference is `evals/eval_xor_full.py` of github.com/AkariAsai/XORQA (last changed 2020-10-24). Published
XOR-Full numbers come from that script, so this module reproduces its code path step by step, quirks included,
rather than the better-known SQuAD evaluation; a "fixed" metric would not be comparable with the papers:

* Normalisation (`normalize_answer`): lower-case, drop ASCII `string.punctuation` only, *then* delete the counter
  characters 年 歳 人 년 anywhere in the string (in every language, not only ja/ko), then collapse whitespace.
  Unlike SQuAD there is no article removal ("the"/"a"/"an" stay), and non-ASCII punctuation (。、「」،؟ ...) stays.
* Tokens are whitespace tokens of the normalised string. Japanese is first segmented with MeCab `-Owakati`; no other
  language gets special treatment: zh and th (no spaces) are one token per answer, so their F1 equals their EM
  unless the answer itself contains spaces. There is no character-level fallback in the official script.
* Japanese predictions (not gold answers) have "・" replaced by " " and "、" by "," before MeCab.
* F1 and EM are each the max over the gold answers (possibly from different golds). F1 is 0 when nothing overlaps,
  also when both sides normalise to empty (SQuAD v2 would give 1); EM of two empty strings is 1.
* BLEU is `nltk.translate.bleu` (= `sentence_bleu`, BLEU-4, uniform weights, no smoothing) called on *plain
  strings*, so it is character-level. Its references are the gold answers as passed to F1 (for ja: MeCab's raw
  output, with the separating spaces and the trailing " \\n"), its hypothesis the *raw* prediction (not segmented).
  Without smoothing, an n-gram order with no match counts as `sys.float_info.min`, so an answer shorter than 4
  characters gets a BLEU of ~1e-77 instead of 0 (0 exactly only when no character matches). The score is the
  multi-reference BLEU over all golds, not a max.
* Per language, each metric is summed over that language's questions and divided by their count; a question
  without a prediction counts with 0 on all three metrics. The printed average sums the per-language averages and
  divides by 7 (the XOR-Full languages) whatever languages the data holds.
* Prediction ids are cut to the text after their last "_" (`id.split("_")[-1]`), gold ids are not.

Known divergence: the official script used mecab-python3 with the dictionary its README installs (`pip install
mecab-python3 unidic-lite`, so UniDic-lite). Here MeCab comes from `fugashi` with the same `unidic-lite` package; both
wrap MeCab 0.996 and give the same segmentation (fugashi's `parse` strips MeCab's trailing " \\n", so the raw
`-Owakati` string is rebuilt from the node surfaces, byte for byte). A system MeCab with IPAdic, as older
mecab-python3 wheels bundled, can segment differently and change ja scores slightly.
"""

from __future__ import annotations

import functools
import json
import string
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The languages of XOR-Full; the official average divides by their number even when some are absent.
XOR_FULL_LANGUAGES: tuple[str, ...] = ("ar", "bn", "fi", "ja", "ko", "ru", "te")
# Counter/unit characters the official normalisation deletes (years, ages, people; Korean year).
COUNTER_CHARACTERS: tuple[str, ...] = ("年", "歳", "人", "년")
_PUNCTUATION = frozenset(string.punctuation)
_JA_TOKENIZER_HINT = "Japanese answers need MeCab with UniDic-lite: pip install fugashi==1.5.2 unidic-lite==1.0.8"


def normalize_answer(text: str) -> str:
    """The official `normalize_answer`: lower -> strip ASCII punctuation -> delete counters -> collapse spaces.

    The order matters: "-" is removed before splitting, so "Санкт-Петербург" becomes one token, and counters are
    removed after MeCab, so "1964 年" compares equal to "1964".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    for counter in COUNTER_CHARACTERS:
        text = text.replace(counter, "")
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """EM of one pair: equal after `normalize_answer` (the caller segments Japanese first)."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of one pair on whitespace tokens of the normalised strings; 0 when no token is shared."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """Best score over the gold answers; raises ValueError on an empty list, as the official `max([])` does."""
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


@functools.cache
def _wakati_tagger() -> Any:
    """One MeCab tagger per process, imported lazily so other languages never need MeCab installed."""
    try:
        import fugashi
    except ImportError as e:
        raise ImportError(_JA_TOKENIZER_HINT) from e
    try:
        return fugashi.Tagger("-Owakati")
    except RuntimeError as e:  # fugashi is there but finds no dictionary
        raise ImportError(_JA_TOKENIZER_HINT) from e


def mecab_wakati(text: str) -> str:
    """MeCab `-Owakati` output as `MeCab.Tagger("-Owakati").parse(text)` returns it: each token + " ", then "\\n".

    The trailing " \\n" is kept on purpose: the official BLEU counts it as reference characters.
    """
    return "".join(node.surface + " " for node in _wakati_tagger()(text)) + "\n"


def _as_gold_list(golds: str | Sequence[str]) -> list[str]:
    """The official script accepts a bare string as a single gold answer."""
    return [golds] if isinstance(golds, str) else list(golds)


def prepare_answers(prediction: str, golds: str | Sequence[str], lang: str) -> tuple[str, list[str]]:
    """The strings F1/EM compare (and BLEU uses as references): MeCab-segmented for ja, unchanged otherwise."""
    gold_list = _as_gold_list(golds)
    if lang == "ja":
        final_golds = [mecab_wakati(gold) for gold in gold_list]
        final_prediction = mecab_wakati(prediction.replace("・", " ").replace("、", ","))
        return final_prediction, final_golds
    return prediction, gold_list


def squad_f1_em(prediction: str, golds: str | Sequence[str], lang: str) -> tuple[float, float]:
    """(F1, EM) of one answer, each the max over the golds, for any language code (ar, de, ..., zh, ja, ...).

    Only "ja" is treated specially (MeCab); every other language, zh and th included, is compared on whitespace
    tokens exactly as the official script does. EM is returned as 0.0/1.0.
    """
    final_prediction, final_golds = prepare_answers(prediction, golds, lang)
    f1 = metric_max_over_ground_truths(f1_score, final_prediction, final_golds)
    em = metric_max_over_ground_truths(exact_match_score, final_prediction, final_golds)
    return float(f1), float(em)


def _nltk_char_bleu(references: Sequence[str], hypothesis: str) -> float:
    """`nltk.translate.bleu(references, hypothesis)` on plain strings, its 0-overlap warnings silenced."""
    from nltk.translate import bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(bleu(list(references), hypothesis))


def answer_bleu(prediction: str, golds: str | Sequence[str], lang: str) -> float:
    """The official per-question BLEU: per character; refs = F1's golds (MeCab output for ja), raw hypothesis."""
    _, final_golds = prepare_answers(prediction, golds, lang)
    return _nltk_char_bleu(final_golds, prediction)


@dataclass(frozen=True)
class ExampleScores:
    """The three official scores of one question (EM as 0.0/1.0)."""

    f1: float
    em: float
    bleu: float


def score_example(prediction: str, golds: str | Sequence[str], lang: str) -> ExampleScores:
    """F1, EM and BLEU of one question, segmenting Japanese once for all three."""
    final_prediction, final_golds = prepare_answers(prediction, golds, lang)
    return ExampleScores(
        f1=float(metric_max_over_ground_truths(f1_score, final_prediction, final_golds)),
        em=float(metric_max_over_ground_truths(exact_match_score, final_prediction, final_golds)),
        bleu=_nltk_char_bleu(final_golds, prediction),
    )


@dataclass(frozen=True)
class LanguageScores:
    """Mean F1/EM/BLEU (fractions, not percent) over `count` questions of one language."""

    count: int
    f1: float
    em: float
    bleu: float


def per_language_scores(
    dataset: Iterable[Mapping[str, Any]], predictions: Mapping[str, str]
) -> dict[str, LanguageScores]:
    """The official `calculate_f1_em_bleu`: per-language means over XOR-Full records (`id`, `answers`, `lang`).

    A record whose id has no prediction still counts in its language's denominator. Languages appear in the order
    first seen; the official dict also lists its other languages with zeros, which changes no average.
    """
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for record in dataset:
        lang = record["lang"]
        sums.setdefault(lang, [0.0, 0.0, 0.0])
        counts[lang] = counts.get(lang, 0) + 1
        q_id = record["id"]
        if q_id not in predictions:
            continue
        scores = score_example(predictions[q_id], record["answers"], lang)
        total = sums[lang]
        total[0] += scores.f1
        total[1] += scores.em
        total[2] += scores.bleu
    return {
        lang: LanguageScores(count=counts[lang], f1=f1 / counts[lang], em=em / counts[lang], bleu=bleu / counts[lang])
        for lang, (f1, em, bleu) in sums.items()
    }


def macro_average(
    per_language: Mapping[str, LanguageScores], num_languages: int | None = len(XOR_FULL_LANGUAGES)
) -> dict[str, float]:
    """Sum of the per-language means divided by `num_languages` (fractions; the official script prints x100).

    The default 7 is the official denominator, fixed whatever languages are present, so a run on a subset is
    penalised for the missing ones. `num_languages=None` divides by the languages present instead, a plain mean
    for other benchmarks.
    """
    denominator = len(per_language) if num_languages is None else num_languages
    if denominator <= 0:
        raise ValueError("macro average over no language")
    return {
        key: sum(getattr(scores, key) for scores in per_language.values()) / denominator
        for key in ("f1", "em", "bleu")
    }


def load_gold(path: str) -> list[dict[str, Any]]:
    """XOR-Full gold data: one JSON object per line with at least `id`, `answers` (list or string) and `lang`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize_prediction_ids(predictions: Mapping[str, str]) -> dict[str, str]:
    """The official key rewrite `id.split("_")[-1]`, so "ja_-123" and "-123" both match gold id "-123"."""
    return {q_id.split("_")[-1]: answer for q_id, answer in predictions.items()}


def load_predictions(path: str) -> dict[str, str]:
    """A prediction file (one JSON object: question id -> answer string), ids rewritten as the official script does."""
    with open(path, encoding="utf-8") as f:
        return normalize_prediction_ids(json.load(f))


def evaluate_xor_full(gold_path: str, prediction_path: str) -> dict[str, Any]:
    """Both files -> {"per_language": {lang: LanguageScores}, "macro": {f1, em, bleu}}, fractions in [0, 1]."""
    per_language = per_language_scores(load_gold(gold_path), load_predictions(prediction_path))
    return {"per_language": per_language, "macro": macro_average(per_language)}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m umr_jax.answer_metrics GOLD.jsonl PRED.json`: the official report, in percent."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m umr_jax.answer_metrics GOLD.jsonl PREDICTIONS.json")
    result = evaluate_xor_full(args[0], args[1])
    for lang, scores in result["per_language"].items():
        print(f"{lang}: F1 {scores.f1 * 100:.2f}  EM {scores.em * 100:.2f}  BLEU {scores.bleu * 100:.2f}"
              f"  ({scores.count} questions)")
    macro = result["macro"]
    print(f"avg f1: {macro['f1'] * 100:.2f}  avg em: {macro['em'] * 100:.2f}  avg bleu: {macro['bleu'] * 100:.2f}")


if __name__ == "__main__":
    main()
