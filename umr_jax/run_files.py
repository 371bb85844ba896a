"""Retrieval results on disk: TREC run files (for any IR tool) and JSONL (for the teacher stage).

JSONL: one line per query, `{"id", "lang", "passages": [ids best first], "scores": [...]}`.
TREC: `qid Q0 docid rank score tag`, rank from 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from umr_jax import atomic, storage
from umr_jax.data.readers import InputError


@dataclasses.dataclass(frozen=True)
class Ranking:
    query_id: str
    lang: str
    passage_ids: list[str]
    scores: list[float]


def rankings_from_search(query_ids: Sequence[str], langs: Sequence[str], passage_ids: Sequence[str],
                         scores: np.ndarray, indices: np.ndarray) -> list[Ranking]:
    if not len(query_ids) == len(langs) == len(scores) == len(indices):
        raise ValueError(f"{len(query_ids)} query ids, {len(langs)} langs, {len(scores)} result rows")
    return [Ranking(q, lang, [passage_ids[i] for i in idx], [float(s) for s in sc])
            for q, lang, sc, idx in zip(query_ids, langs, scores, indices, strict=True)]


def write_jsonl(path: str | os.PathLike, rankings: Sequence[Ranking]) -> None:
    with atomic.atomic_open(path, "w") as f:
        for r in rankings:
            f.write(json.dumps({"id": r.query_id, "lang": r.lang, "passages": r.passage_ids,
                                "scores": r.scores}, ensure_ascii=False) + "\n")


def write_trec(path: str | os.PathLike, rankings: Sequence[Ranking], tag: str = "umr_jax") -> None:
    with atomic.atomic_open(path, "w") as f:
        for r in rankings:
            for rank, (pid, score) in enumerate(zip(r.passage_ids, r.scores, strict=True), start=1):
                f.write(f"{r.query_id} Q0 {pid} {rank} {score:.6f} {tag}\n")


def read_jsonl(path: str | os.PathLike) -> list[Ranking]:
    path = str(path)
    rankings = []
    with storage.open(path) as f:
        for line_no, line in enumerate(f, start=1):
            try:
                d = json.loads(line)
                r = Ranking(str(d["id"]), str(d["lang"]), [str(p) for p in d["passages"]],
                            [float(s) for s in d["scores"]])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InputError(path, line_no, f"malformed ranking: {e!r}") from None
            if len(r.passage_ids) != len(r.scores):
                raise InputError(path, line_no, "malformed ranking: passages and scores differ in length")
            rankings.append(r)
    return rankings


def as_run(rankings: Sequence[Ranking], k: int | None = None) -> dict[str, list[str]]:
    """query id -> ranked passage ids (cut at k), the input of the metrics."""
    return {r.query_id: r.passage_ids[:k] for r in rankings}


def merge_rankings(parts: Sequence[Sequence[Ranking]], k: int) -> list[Ranking]:
    """The global top k of per-shard rankings of the same queries (same order in every part).

    Passages of different shards never coincide; equal scores keep shard order.
    """
    if not parts:
        return []
    merged = []
    for rows in zip(*parts, strict=True):
        query_ids = {r.query_id for r in rows}
        if len(query_ids) != 1:
            raise ValueError(f"merge_rankings: parts disagree on the query order ({sorted(query_ids)[:3]})")
        pairs = [(s, p) for r in rows for p, s in zip(r.passage_ids, r.scores, strict=True)]
        order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])[:k]
        merged.append(Ranking(rows[0].query_id, rows[0].lang, [pairs[i][1] for i in order],
                              [pairs[i][0] for i in order]))
    return merged
