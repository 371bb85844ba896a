"""Query search over an encoded corpus: the index of an embedding store and the top-k rankings of queries.

A library of its own so that the UMR binary (umr_jax/main.py), the retrieval
binary (umr_jax/retrieve.py) and the XQuAD-R evaluator share one search path
without importing each other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import ml_collections
from absl import logging
from jax.sharding import Mesh

from umr_jax import encode, faults, index, retriever, run_files, storage
from umr_jax.data.readers import Query


def search_queries(model: retriever.Retriever, idx: index.SearchIndex, passage_ids: Sequence[str],
                   queries: Sequence[Query], k: int, batch: int = 1024,
                   desc: str = "encode queries") -> list[run_files.Ranking]:
    """Encodes the queries with the query tower and returns their top-k rankings."""
    emb = model.encode([q.text for q in queries], "query", desc=desc)
    result = index.search_all(idx, emb, k, batch=batch)
    return run_files.rankings_from_search([q.id for q in queries], [q.lang for q in queries], passage_ids,
                                          result.scores, result.indices)


def saved_index_files(directory: str) -> list[str]:
    """The marker files of a saved index: `directory`/index.json, or one per shard of a multi-process run."""
    if storage.exists(os.path.join(directory, "index.json")):
        return [os.path.join(directory, "index.json")]
    shards = [re.fullmatch(r"shard-\d+-of-(\d+)", name) for name in storage.listdir(directory)
              if storage.isdir(os.path.join(directory, name))] if storage.isdir(directory) else []
    counts = sorted({int(m.group(1)) for m in shards if m})
    if not counts:
        return [os.path.join(directory, "index.json")]
    return [os.path.join(directory, f"shard-{p}-of-{counts[-1]}", "index.json") for p in range(counts[-1])]


def load_or_build_index(store: encode.EmbeddingStore, directory: str, cfg: ml_collections.ConfigDict,
                        mesh: Mesh, k: int, process_index: int = 0,
                        process_count: int = 1) -> tuple[list[str], index.SearchIndex]:
    """The index of the whole store, or of process p's shard of n (in `directory`/shard-p-of-n).

    A saved index is reused, so a resumed run does not rebuild (ScaNN training
    is the slow part) and reads only the passage ids (a saved ScaNN index holds
    its own data; an exact index is the store's embeddings, read again).
    """
    if process_count > 1:
        directory = os.path.join(directory, f"shard-{process_index}-of-{process_count}")
    if storage.exists(os.path.join(directory, "index.json")):
        logging.info("reusing the index in %s", directory)
        loaded: dict[str, list[str]] = {}

        def embeddings():  # an exact index reads the store once, ids with the embeddings
            loaded["ids"], matrix = store.load(process_index, process_count)
            return matrix

        idx = index.load_index(directory, cfg, mesh, embeddings=embeddings)
        ids = loaded["ids"] if "ids" in loaded else store.load_ids(process_index, process_count)
        if idx.size != len(ids):
            raise ValueError(f"{directory}: an index of {idx.size} passages for a store of {len(ids)}: the store "
                             f"changed since it was built; delete {directory} to build it again")
        return ids, idx
    ids, embeddings = store.load(process_index, process_count)
    idx = index.build_index(embeddings, cfg, mesh, k=k)
    del embeddings  # ScaNN keeps its own copy; an exact index its device arrays
    faults.point("index.built")
    idx.save(directory)
    return ids, idx
