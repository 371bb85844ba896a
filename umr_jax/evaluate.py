"""Retrieval metrics: the benchmarks' own definitions, plus standard IR metrics from pytrec_eval.

- XOR-Retrieve R@2kt / R@5kt (Asai et al. 2021, official `eval_xor_retrieve.py`):
  the retrieved passages' texts are word-tokenized in rank order and cut at
  2,000 / 5,000 tokens; a question counts as a hit if any of its answers
  (yes/no answers excluded; questions with only those are skipped) is a
  substring of the space-joined tokens. Reported per language and as the
  macro average over languages.
- XQuAD-R (LAReQA) mAP@20: average precision over the top 20 of the pooled
  multilingual candidates, each question having 11 relevant sentences (one per
  language); per query language and macro average. Computed by pytrec_eval's
  `map_cut_20`, whose normalisation (the number of relevant items) is LAReQA's.
- Recall@k, MRR@k, nDCG@k, mAP@k: pytrec_eval (trec_eval's C code).
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

AVERAGE = "avg"
_MEASURE = re.compile(r"(recall|mrr|ndcg|map|precision)@(\d+)")
_TREC_NAMES = {"recall": "recall", "ndcg": "ndcg_cut", "map": "map_cut", "precision": "P"}


def check_measure(measure: str) -> str:
    """`measure` if ranked_metrics knows it, else a ValueError naming the accepted forms."""
    _parse_measure(measure)
    return measure


def same_language_share(passage_langs: Sequence[str], query_lang: str) -> float:
    """The fraction of a top list in the query's language (LAReQA's "language bias")."""
    return sum(lang == query_lang for lang in passage_langs) / max(len(passage_langs), 1)


def _parse_measure(measure: str) -> tuple[str, int]:
    m = _MEASURE.fullmatch(measure)
    if not m:
        raise ValueError(f"unknown measure {measure!r}; use name@k with name in "
                         f"{sorted([*_TREC_NAMES, 'mrr'])}, e.g. recall@100, mrr@10, ndcg@10, map@20")
    return m.group(1), int(m.group(2))


def ranked_metrics(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Iterable[str] | Mapping[str, int]],
                   measures: Sequence[str] = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10",
                                              "map@20")) -> dict[str, dict[str, float]]:
    """Per-query metrics for a ranked run (query id -> passage ids, best first).

    `qrels` gives each query its relevant passage ids, or passage id -> grade
    (graded nDCG; a grade of 0 or below judges a passage not relevant). Every
    query of `run` needs relevance judgements; queries of `qrels` absent from
    `run` score 0 (a missing ranking is a miss, not a skip).
    """
    import pytrec_eval
    unjudged = [q for q in run if q not in qrels]
    if unjudged:
        raise ValueError(f"{len(unjudged)} queries of the run have no relevance judgements, e.g. {unjudged[:5]}")
    trec_qrels = {q: {p: int(g) for p, g in rel.items()} if isinstance(rel, Mapping) else {p: 1 for p in rel}
                  for q, rel in qrels.items()}
    empty = [q for q, rel in trec_qrels.items() if not any(g > 0 for g in rel.values())]
    if empty:
        raise ValueError(f"{len(empty)} queries have no relevant passage, e.g. {empty[:5]}")
    parsed = [(m, *_parse_measure(m)) for m in measures]
    results: dict[str, dict[str, float]] = {q: {} for q in qrels}
    trec = {_TREC_NAMES[n] for _, n, _ in parsed if n != "mrr"}
    if trec:
        cuts = {n: sorted({k for _, n2, k in parsed if n2 == n}) for n in _TREC_NAMES if n in {p[1] for p in parsed}}
        spec = {f"{_TREC_NAMES[n]}.{','.join(map(str, ks))}" for n, ks in cuts.items()}
        per_query = pytrec_eval.RelevanceEvaluator(trec_qrels, spec).evaluate(_trec_run(run))
        for name, n, k in parsed:
            if n != "mrr":
                for q in qrels:
                    results[q][name] = per_query.get(q, {}).get(f"{_TREC_NAMES[n]}_{k}", 0.0)
    for name, n, k in parsed:
        if n == "mrr":  # trec_eval's recip_rank has no cut-off: cut the run itself
            per_query = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(
                _trec_run({q: r[:k] for q, r in run.items()}))
            for q in qrels:
                results[q][name] = per_query.get(q, {}).get("recip_rank", 0.0)
    missing = len(qrels) - sum(q in run for q in qrels)
    if missing:
        logging.warning("%d judged queries have no ranking; they count as misses", missing)
    return results


def _trec_run(run: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Ranks as strictly decreasing scores, so trec_eval's tie-breaking never reorders them."""
    out = {}
    for q, ranked in run.items():
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"query {q!r}: the ranking repeats passages")
        out[q] = {p: float(len(ranked) - r) for r, p in enumerate(ranked)}
    return out


def by_language(per_query: Mapping[str, Mapping[str, float]],
                langs: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Means per language plus their macro average (each language weighs the same)."""
    groups: dict[str, list[Mapping[str, float]]] = collections.defaultdict(list)
    for q, values in per_query.items():
        groups[langs[q]].append(values)
    table = {lang: {m: float(np.mean([v[m] for v in rows])) for m in rows[0]} for lang, rows in sorted(groups.items())}
    if table:
        names = next(iter(table.values())).keys()
        table[AVERAGE] = {m: float(np.mean([t[m] for t in table.values()])) for m in names}
    return table


@functools.cache
def _word_tokenizer() -> Callable[[str], list[str]]:
    """nltk.word_tokenize as the official script uses it (English Punkt sentences + Treebank words).

    Offline machines may lack nltk's `punkt_tab` data; then an untrained Punkt
    splitter stands in (it differs only around abbreviations such as "Mr.").
    """
    import nltk
    from nltk.tokenize import NLTKWordTokenizer, word_tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return word_tokenize
    except LookupError:
        logging.warning("nltk 'punkt_tab' data not installed (python -m nltk.downloader punkt_tab); R@kt uses "
                        "an untrained Punkt sentence splitter, which can differ from the official counts "
                        "around abbreviations")
        sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
        return lambda text: [w for s in sentences.tokenize(text) for w in words.tokenize(s)]


def answer_hit_at_tokens(contexts: Sequence[str], answers: Sequence[str], max_tokens: int,
                         tokenize: Callable[[str], list[str]] | None = None) -> bool:
    tokenize = tokenize or _word_tokenizer()
    tokens: list[str] = []
    for text in contexts:
        tokens += tokenize(text)
        if len(tokens) >= max_tokens:
            break
    joined = " ".join(tokens[:max_tokens])
    return any(a in joined for a in answers)


def xor_retrieve_per_query(contexts: Mapping[str, Sequence[str]], answers: Mapping[str, Sequence[str]],
                           k_tokens: Sequence[int] = (2000, 5000),
                           tokenize: Callable[[str], list[str]] | None = None) -> dict[str, dict[str, float]]:
    """R@{k}kt (0 or 100) per question.

    `contexts`: query id -> retrieved passage texts in rank order. Questions
    whose answers are all yes/no are skipped, as officially; questions with
    span answers but no retrieval count as misses.
    """
    per_query: dict[str, dict[str, float]] = {}
    for q, golds in answers.items():
        spans = [a for a in golds if a not in ("yes", "no")]
        if not spans:
            continue
        ctx = contexts.get(q, ())
        per_query[q] = {f"R@{k // 1000}kt": 100.0 * answer_hit_at_tokens(ctx, spans, k, tokenize)
                        for k in k_tokens}
    return per_query
