"""Metrics against hand-computed answers."""

import math

import pytest

from helpers import xor_retrieve_recall
from umr_jax.evaluate import answer_hit_at_tokens, by_language, ranked_metrics

QRELS = {"q1": {"a", "b"}, "q2": {"c"}}
RUN = {"q1": ["a", "x", "b"], "q2": ["x", "y", "c"]}


def test_library_metrics_match_hand_computation():
    m = ranked_metrics(RUN, QRELS, ["recall@1", "recall@10", "mrr@2", "mrr@10", "ndcg@3", "map@20", "map@2"])
    assert m["q1"]["recall@1"] == pytest.approx(0.5)
    assert m["q1"]["recall@10"] == pytest.approx(1.0)
    assert m["q2"]["mrr@2"] == 0.0  # relevant only at rank 3
    assert m["q2"]["mrr@10"] == pytest.approx(1 / 3)
    assert m["q1"]["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    # AP = mean over ALL relevant items of precision at their ranks (LAReQA/trec_eval).
    assert m["q1"]["map@20"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["q1"]["map@2"] == pytest.approx((1 / 1) / 2)  # b at rank 3 falls outside the cut
    assert m["q2"]["map@20"] == pytest.approx(1 / 3)


def test_lareqa_map_at_20_with_eleven_relevant():
    # One relevant per language; 3 of the 11 retrieved at ranks 1, 4, 21 (the last past the cut).
    relevant = {f"{lang}:s" for lang in "abcdefghijk"}
    ranked = ["a:s", "n1", "n2", "b:s"] + [f"n{i}" for i in range(3, 19)] + ["c:s"]
    m = ranked_metrics({"q": ranked}, {"q": relevant}, ["map@20"])
    assert m["q"]["map@20"] == pytest.approx((1 / 1 + 2 / 4) / 11)


def test_missing_rankings_count_as_misses_and_unjudged_queries_fail():
    m = ranked_metrics({"q1": ["a"]}, QRELS, ["recall@10"])
    assert m["q2"]["recall@10"] == 0.0
    with pytest.raises(ValueError, match="no relevance judgements"):
        ranked_metrics({"q9": ["a"]}, QRELS, ["recall@10"])
    with pytest.raises(ValueError, match="unknown measure"):
        ranked_metrics(RUN, QRELS, ["recall"])
    with pytest.raises(ValueError, match="repeats"):
        ranked_metrics({"q1": ["a", "a"]}, QRELS, ["recall@10"])


def test_by_language_macro_averages_languages_not_queries():
    table = by_language({"1": {"m": 1.0}, "2": {"m": 0.0}, "3": {"m": 0.0}, "4": {"m": 1.0}},
                        {"1": "en", "2": "en", "3": "en", "4": "ja"})
    assert table["en"]["m"] == pytest.approx(1 / 3) and table["ja"]["m"] == 1.0
    assert table["avg"]["m"] == pytest.approx((1 / 3 + 1) / 2)


def test_r_at_kt_cuts_tokens_across_passages():
    split = str.split
    contexts = ["w " * 1500, "f " * 600 + "Paris France"]  # "Paris" is token 2,101
    assert not answer_hit_at_tokens(contexts, ["Paris"], 2000, split)
    assert answer_hit_at_tokens(contexts, ["Paris"], 5000, split)
    assert answer_hit_at_tokens(contexts, ["Paris France"], 5000, split)  # multi-word answers span tokens
    assert not answer_hit_at_tokens(["w " * 2000 + "Paris"], ["Paris"], 2000, split)


def test_xor_retrieve_recall_official_semantics():
    contexts = {"a": ["The capital is Paris."], "b": ["nothing here"], "c": ["yes it is"], "d": ["Tokyo."]}
    answers = {"a": ["Paris"], "b": ["Rome"], "c": ["yes"], "d": ["no", "Tokyo"], "e": ["Lima"]}
    langs = {"a": "ar", "b": "ar", "c": "ar", "d": "ja", "e": "ja"}
    table = xor_retrieve_recall(contexts, answers, langs)
    # c (yes/no only) is skipped; e has no retrieval: a miss. nltk splits "Paris." -> "Paris", ".".
    assert table["ar"] == {"R@2kt": 50.0, "R@5kt": 50.0}
    assert table["ja"] == {"R@2kt": 50.0, "R@5kt": 50.0}
    assert table["avg"]["R@5kt"] == 50.0


# Traced by hand through evaluate_top_k_hit of the official eval_xor_retrieve.py (AkariAsai/XORQA,
# copied into MiuLab/UMR's evals/): per prediction, skip ids without gold answers; drop "yes"/"no"
# answers and skip the question if none is left; count it; then for each retrieved passage text in
# rank order append nltk.word_tokenize(text) to the tokens and stop once there are >= max tokens; cut
# to max tokens; join with single spaces; hit if any answer is a substring of that string. R@{2,5}kt
# of a language = hits / count * 100; languages with no counted question are not reported; the
# headline is the mean over languages.
R_AT_KT_FIXTURE = {
    # id: (language, retrieved passage texts, gold answers, expected (R@2kt, R@5kt))
    "q1": ("ar", ["The capital is Paris."], ["Paris"], (100.0, 100.0)),  # "... Paris ." contains it
    "q2": ("ar", ["I don't know."], ["don't"], (0.0, 0.0)),  # tokens "do n't": the string is "I do n't know ."
    "q3": ("ar", ["yes"], ["yes", "no"], None),  # yes/no only: not counted
    "q4": ("ja", ["w " * 1999 + "x", "Tokyo Tower"], ["Tokyo"], (0.0, 100.0)),  # passage 1 fills 2,000 tokens
    "q5": ("ja", ["Parisian food"], ["Paris"], (100.0, 100.0)),  # a substring, not a word match
    "q6": ("ja", ["New York, USA"], ["York, USA"], (0.0, 0.0)),  # "New York , USA"
    "q7": ("ja", ['"Quoted" text'], ['"Quoted"'], (0.0, 0.0)),  # quotes become `` and ''
    "q8": ("ko", ["no"], ["no"], None),  # ko has no counted question: not reported
}
OFFICIAL_TOKENS = {  # nltk.word_tokenize with the English Punkt model, for the fixture's texts
    "The capital is Paris.": ["The", "capital", "is", "Paris", "."],
    "I don't know.": ["I", "do", "n't", "know", "."],
    "Parisian food": ["Parisian", "food"],
    "New York, USA": ["New", "York", ",", "USA"],
    '"Quoted" text': ["``", "Quoted", "''", "text"],
}


def test_r_at_kt_fixture_traced_through_the_official_script():
    from umr_jax.evaluate import xor_retrieve_per_query
    contexts = {q: texts for q, (_, texts, _, _) in R_AT_KT_FIXTURE.items()}
    answers = {q: golds for q, (_, _, golds, _) in R_AT_KT_FIXTURE.items()}
    langs = {q: lang for q, (lang, _, _, _) in R_AT_KT_FIXTURE.items()}
    per_query = xor_retrieve_per_query(contexts, answers)
    assert {q: (row["R@2kt"], row["R@5kt"]) for q, row in per_query.items()} == {
        q: expected for q, (_, _, _, expected) in R_AT_KT_FIXTURE.items() if expected is not None}
    table = by_language(per_query, langs)
    assert table["ar"] == {"R@2kt": 50.0, "R@5kt": 50.0}
    assert table["ja"] == {"R@2kt": 25.0, "R@5kt": 50.0}
    assert "ko" not in table
    assert table["avg"] == {"R@2kt": 37.5, "R@5kt": 50.0}


def test_the_r_at_kt_tokenizer_agrees_with_the_official_one_on_the_fixture():
    """Without nltk's punkt_tab data (no registry package ships it) R@kt falls back to an untrained
    Punkt sentence splitter; on the fixture's texts it gives the official tokens."""
    from umr_jax.evaluate import _word_tokenizer
    tokenize = _word_tokenizer()
    assert {text: tokenize(text) for text in OFFICIAL_TOKENS} == OFFICIAL_TOKENS
    assert len(tokenize("w " * 1999 + "x")) == 2000
