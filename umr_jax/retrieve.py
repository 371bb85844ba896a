"""The retrieval side of a UMR round as one command: corpus -> embeddings -> index -> top-k run files.

    python -m umr_jax.retrieve --corpus=psgs_w100.tsv --queries=queries.jsonl --workdir=/tmp/run \
        [--config.retriever.checkpoint=facebook/mcontriever] [--config.index.backend=exact] [--config.k=100]

Each stage leaves its output in the workdir (`embeddings/`, `index/`,
`run.jsonl` + `run.trec`); a re-run reuses what is complete, so a killed job
resumes (encoding at the last finished chunk). The JSONL run is the teacher
stage's input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from umr_jax import cli, encode, index, retriever, run_files, sharding
from umr_jax.data.readers import check_on_error, read_queries_jsonl
from umr_jax.search import load_or_build_index, search_queries


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.k = 100  # passages retrieved per query (UMR: top-100)
    cfg.mesh_shape = (-1, 1)  # (data, model)
    cfg.retriever = retriever.default_config()
    cfg.encode = encode.default_config()
    cfg.index = index.default_config()
    cfg.queries_on_error = "raise"  # bad query lines: 'raise' or 'skip' (counted)
    return cfg


def run(cfg: ml_collections.ConfigDict, corpus: str, queries_path: str, workdir: str) -> list[run_files.Ranking]:
    queries, report = read_queries_jsonl(queries_path, on_error=check_on_error(cfg.queries_on_error))
    check_on_error(cfg.encode.on_error)
    if not queries:
        raise ValueError(f"{queries_path}: no usable queries ({report.summary()})")
    logging.info("queries: %s", report.summary())
    mesh = sharding.make_mesh(tuple(cfg.mesh_shape), ("data", "model"))
    model = retriever.Retriever.from_config(cfg.retriever, mesh)
    store = encode.encode_corpus_file(model, corpus, os.path.join(workdir, "embeddings"), cfg.encode,
                                      jax.process_index(), jax.process_count())
    logging.info("corpus: %s", store.report().summary())
    ids, idx = load_or_build_index(store, os.path.join(workdir, "index"), cfg.index, mesh, cfg.k)
    rankings = search_queries(model, idx, ids, queries, min(cfg.k, len(ids)), cfg.index.query_batch)
    run_files.write_jsonl(os.path.join(workdir, "run.jsonl"), rankings)
    run_files.write_trec(os.path.join(workdir, "run.trec"), rankings)
    logging.info("wrote %d rankings to %s/run.{jsonl,trec}", len(rankings), workdir)
    return rankings


@cli.reports_user_errors("umr_jax.retrieve")
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    run(f.config, f.corpus, f.queries, f.workdir)


def define_flags() -> None:
    """Flags exist only when this module is the program: importing it (tests, other CLIs) defines none."""
    config_flags.DEFINE_config_dict("config", default_config(), "retrieval settings")
    flags.DEFINE_string("corpus", None, "passage corpus, DPR TSV (id, text, title)", required=True)
    flags.DEFINE_string("queries", None, "queries, JSONL (id, text|question, lang)", required=True)
    flags.DEFINE_string("workdir", None, "output and resume directory", required=True)


if __name__ == "__main__":
    cli.run("umr_jax.retrieve", main, define_flags)
