"""XQuAD-R (LAReQA) evaluation of a retriever: every question searches the pooled multilingual candidates.

    python -m umr_jax.xquad_r_eval --workdir=/tmp/xquad_r [--config.retriever.checkpoint=...]

Candidates are encoded with the passage tower as "sentence + paragraph"
(LAReQA feeds the answer sentence with its context); questions with the query
tower. Reports mAP@20 (the benchmark's metric) and recall/MRR/nDCG per query
language and macro-averaged, plus the share of the top 20 that is in the
question's own language (LAReQA's "language bias": a language-agnostic
retriever would put 10 of the 11 relevant sentences in other languages).
Candidate embeddings are stored in the workdir in resumable chunks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from absl import app, logging
from ml_collections import config_flags

from umr_jax import atomic, cli, encode, index, report, retriever, run_files, sharding
from umr_jax.data.readers import Query
from umr_jax.data.xquad_r import candidate_passages, evaluate_rankings, load_xquad_r, select_questions
from umr_jax.search import search_queries


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.mesh_shape = (-1, 1)
    cfg.retriever = retriever.default_config()
    cfg.encode = encode.default_config()
    cfg.encode.chunk_size = 2048
    cfg.encode.passage_template = "{text}"  # the candidate text below is already formatted
    cfg.candidate_template = "{sentence} {context}"  # sentence first: truncation never cuts it
    cfg.index = index.default_config()
    cfg.index.backend = "exact"  # 13k candidates: exact search, the metric's own ground truth
    cfg.k = 100
    cfg.measures = ("map@20", "recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")
    cfg.languages = ()  # query languages to evaluate; () = all 11
    cfg.questions_per_language = 0  # 0 = all 1,190; else the first n (same question ids in every language)
    cfg.data_dir = ""  # prepared TFDS data ('' = $UMR_TFDS_DIR or ~/tensorflow_datasets)
    cfg.local_dir = ""  # official files ('' = $UMR_XQUAD_R_DIR or download)
    return cfg


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    data = load_xquad_r(data_dir=cfg.data_dir or None, local_dir=cfg.local_dir or None)
    questions = select_questions(data, tuple(cfg.languages), int(cfg.questions_per_language))
    mesh = sharding.make_mesh(tuple(cfg.mesh_shape), ("data", "model"))
    model = retriever.Retriever.from_config(cfg.retriever, mesh)
    store = encode.encode_passages(model, candidate_passages(data.candidates, cfg.candidate_template),
                                   os.path.join(workdir, "candidates"), cfg.encode)
    ids, embeddings = store.load()
    idx = index.build_index(embeddings, cfg.index, mesh, k=cfg.k)
    rankings = search_queries(model, idx, ids, [Query(q.id, q.question.strip(), q.lang) for q in questions], cfg.k,
                              cfg.index.query_batch, desc="encode questions")
    run_files.write_jsonl(os.path.join(workdir, "run.jsonl"), rankings)
    table = evaluate_rankings(rankings, questions, cfg.measures)
    atomic.write_json(os.path.join(workdir, "metrics.json"), table)
    return table


@cli.reports_user_errors("umr_jax.xquad_r_eval")
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = app.flags.FLAGS
    table = run(f.config, f.workdir)
    logging.info("XQuAD-R metrics written to %s/metrics.json", f.workdir)
    print(report.format_table(table))


def define_flags() -> None:
    """Flags exist only when this module is the program: importing it (tests, other CLIs) defines none."""
    config_flags.DEFINE_config_dict("config", default_config(), "evaluation settings")
    app.flags.DEFINE_string("workdir", None, "output and resume directory", required=True)


if __name__ == "__main__":
    cli.run("umr_jax.xquad_r_eval", main, define_flags)
