"""Open-retrieval QA on XQuAD-R: do a UMR-trained retriever's passages give a reader better answers?

    python -m umr_jax.xquad_r_qa --run=RUN_WORKDIR --output=DIR [--rounds=0,2] \
        [--config.questions_per_language=100] [--config.read.k=3] [--config.split=dev]

A finished xquad_r run (python -m umr_jax.main --config=configs/xquad_r.py)
holds each round's rankings of its held-out questions over the whole
11-language sentence pool. Here each question's top `read.k` sentences of a
round go to the reader (:mod:`umr_jax.reader`, Gemma-3-270M by default), and
so does the gold answer sentence alone (`oracle`: the reader's ceiling with
perfect retrieval). Answers are scored with F1 and exact match against
XQuAD's answer in the question's language (:mod:`umr_jax.answer_metrics`, the
XOR-Full normalisation), per language and macro-averaged, with paired
bootstrap intervals over question clusters (a question's 11 translations
resample together) as in docs/results.md.

`split=train` reads questions of the run's training articles with the oracle
context only: that is where a prompt format is chosen, never on dev questions.
Answers are written in committed chunks; a killed run resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from umr_jax import atomic, cli, evaluate, reader, report, results, run_files, sharding, storage, tasks
from umr_jax.answer_metrics import squad_f1_em
from umr_jax.data.xquad_r import XquadRQuestion, answer_texts, load_xquad_r

MEASURES = ("f1", "em", "own_sentence", "any_sentence")


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.mesh_shape = (-1, 1)
    cfg.read = reader.default_config()
    cfg.read.k = 3
    cfg.split = "dev"  # 'dev' (the run's held-out questions) or 'train' (oracle only: prompt choice)
    cfg.questions_per_language = 100  # a seeded sample of question ids, the same in every language; 0 = all
    cfg.sample_seed = 0
    cfg.context = "sentence"  # what a retrieved candidate shows the reader: 'sentence' or 'paragraph'
    cfg.resamples = 10_000
    return cfg


def choose_questions(questions: Sequence[XquadRQuestion], articles: set[int], per_language: int,
                     seed: int) -> list[XquadRQuestion]:
    """Questions of `articles`; with `per_language`, the same seeded question ids in every language."""
    pool = [q for q in questions if tasks.article_of(q.relevant[0]) in articles]
    if per_language:
        qids = sorted({q.qid for q in pool})
        keep = set(np.random.default_rng([seed, 11]).choice(qids, size=min(per_language, len(qids)),
                                                             replace=False).tolist())
        pool = [q for q in pool if q.qid in keep]
    return pool


class QaEval:
    """One evaluation: questions, contexts per condition, the reader, committed answer chunks."""

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: str, output: str):
        self.cfg, self.run_dir, self.output = cfg, run_dir, output
        run_cfg = ml_collections.ConfigDict(atomic.read_json(os.path.join(run_dir, "config.json")))
        if run_cfg.task != "xquad_r":
            raise ValueError(f"{run_dir}: task {run_cfg.task!r}; this evaluation needs an xquad_r run")
        data_cfg = run_cfg.data
        data = load_xquad_r(data_dir=data_cfg.data_dir or None, local_dir=data_cfg.local_dir or None)
        self.candidates = {c.id: c for c in data.candidates}
        articles = sorted({tasks.article_of(c.id) for c in data.candidates})
        train, dev = tasks.xquad_r_split(len(articles), data_cfg.train_article_fraction, data_cfg.split_seed)
        if cfg.split not in ("dev", "train"):
            raise ValueError(f"split={cfg.split!r}; choose 'dev' or 'train'")
        chosen = choose_questions(data.questions, dev if cfg.split == "dev" else train,
                                  int(cfg.questions_per_language), int(cfg.sample_seed))
        self.questions = [q for q in chosen if not data_cfg.languages or q.lang in data_cfg.languages]
        gold = answer_texts(data_cfg.local_dir or None, {q.lang for q in self.questions})
        if gold is None:
            raise ValueError("the answers are read from the official XQuAD-R files: the run's data.local_dir "
                             "or $UMR_XQUAD_R_DIR must name their directory")
        self.gold = gold

    def contexts(self, condition: str) -> list[list[reader.Context]]:
        """Per question: the oracle sentence, or the top k of round r's dev ranking."""
        field = "sentence" if self.cfg.context == "sentence" else "context"
        return [[reader.Context("", getattr(self.candidates[p], field)) for p in row]
                for row in self.context_ids(condition)]

    def context_ids(self, condition: str) -> list[list[str]]:
        """Candidate ids per question: the answer sentence in the question's language, or round r's top k."""
        if condition == "oracle":
            ids = [[next(r for r in q.relevant if r.startswith(f"{q.lang}:"))] for q in self.questions]
        else:
            path = os.path.join(self.run_dir, condition, "run-dev.jsonl")
            by_id = {x.query_id: x for x in run_files.read_jsonl(path)}
            missing = [q.id for q in self.questions if q.id not in by_id]
            if missing:
                raise ValueError(f"{path}: no ranking for {len(missing)} questions (e.g. {missing[0]}); "
                                 "is this the run's dev split?")
            ids = [by_id[q.id].passage_ids[: int(self.cfg.read.k)] for q in self.questions]
        return ids

    def answers(self, condition: str, model: reader.Reader | None) -> list[str]:
        """Answers in committed chunks under output/condition/ (a killed run resumes at the next chunk)."""
        directory = os.path.join(self.output, condition)
        chunk = int(self.cfg.read.chunk)
        contexts = self.contexts(condition)
        answers: list[str] = []
        for c, begin in enumerate(range(0, len(self.questions), chunk)):
            path = os.path.join(directory, f"chunk-{c:06d}.json")
            part = self.questions[begin:begin + chunk]
            if storage.exists(path):
                answers += atomic.read_json(path)
                continue
            if model is None:
                raise RuntimeError("reader not loaded")
            got = model.answer([q.question.strip() for q in part], [q.lang for q in part],
                               contexts[begin:begin + chunk], desc=f"{condition} chunk {c + 1}")
            atomic.write_json(path, got)
            answers += got
        rows = [{"id": q.id, "lang": q.lang, "question": q.question.strip(), "answer": a, "gold": self.gold[q.id],
                 "passages": [p.text for p in ctx]}
                for q, a, ctx in zip(self.questions, answers, contexts, strict=True)]
        atomic.write_text(os.path.join(directory, "answers.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return answers

    def scores(self, condition: str, answers: Sequence[str]) -> dict[str, dict[str, float]]:
        """F1 and EM per question, and what its context held: the answer sentence in the question's own
        language (`own_sentence`) or in any language (`any_sentence`, the retrieval metrics' relevance)."""
        out = {}
        for q, a, ids in zip(self.questions, answers, self.context_ids(condition), strict=True):
            f1, em = squad_f1_em(a, [self.gold[q.id]], q.lang)
            own = next(r for r in q.relevant if r.startswith(f"{q.lang}:"))
            out[q.id] = {"f1": float(f1), "em": float(em), "own_sentence": float(own in ids),
                         "any_sentence": float(bool(set(ids) & set(q.relevant)))}
        return out


def comparison(per_query: Mapping[str, dict[str, dict[str, float]]], langs: Mapping[str, str],
               pairs: Sequence[tuple[str, str]], resamples: int) -> list[dict]:
    clusters = {q: q.split(":", 1)[1] for q in langs}
    rows = []
    for after, before in pairs:
        for measure in MEASURES:
            interval = results.paired_bootstrap(results.column(per_query[after], measure),
                                                results.column(per_query[before], measure), langs,
                                                clusters=clusters, resamples=resamples)
            rows.append({"after": after, "before": before, "measure": measure, "mean": interval.mean,
                         "low": interval.low, "high": interval.high})
    return rows


def run(cfg: ml_collections.ConfigDict, run_dir: str, output: str, rounds: Sequence[int]) -> dict:
    qa = QaEval(cfg, run_dir, output)
    conditions = ["oracle"] if cfg.split == "train" else [f"round-{r}" for r in rounds] + ["oracle"]
    logging.info("%d %s questions (%d languages), conditions %s", len(qa.questions), cfg.split,
                 len({q.lang for q in qa.questions}), conditions)
    mesh = sharding.make_mesh(tuple(cfg.mesh_shape), ("data", "model"))
    model = None
    per_query = {}
    for condition in conditions:
        done = all(storage.exists(os.path.join(output, condition, f"chunk-{c:06d}.json"))
                   for c in range(-(-len(qa.questions) // int(cfg.read.chunk))))
        if model is None and not done:
            model = reader.Reader.from_config(cfg.read, mesh)
        per_query[condition] = qa.scores(condition, qa.answers(condition, model))
    langs = {q.id: q.lang for q in qa.questions}
    tables = {c: evaluate.by_language(per_query[c], langs) for c in conditions}
    pairs = [(f"round-{rounds[-1]}", f"round-{rounds[0]}")] if len(rounds) > 1 and cfg.split == "dev" else []
    pairs += [("oracle", c) for c in conditions if c != "oracle"]
    summary = {"questions": len(qa.questions), "split": cfg.split, "read": cfg.read.to_dict(),
               "context": cfg.context, "tables": tables,
               "differences": comparison(per_query, langs, pairs, int(cfg.resamples)), "per_query": per_query,
               "languages": langs}
    atomic.write_json(os.path.join(output, "summary.json"), summary)
    for condition, table in tables.items():
        logging.info("%s:\n%s", condition, report.format_table(table))
    for row in summary["differences"]:
        logging.info("%s - %s %s: %+.4f [%+.4f, %+.4f]", row["after"], row["before"], row["measure"], row["mean"],
                     row["low"], row["high"])
    return summary


def combine_seeds(outputs: Sequence[str], resamples: int) -> dict:
    """Seed means of evaluations that differ only in the run's seed: each condition's per-question
    scores averaged over the seeds, then the same paired comparisons as one evaluation makes."""
    summaries = [atomic.read_json(os.path.join(o, "summary.json")) for o in outputs]
    conditions = list(summaries[0]["per_query"])
    langs = summaries[0]["languages"]
    for o, s in zip(outputs, summaries, strict=True):
        if list(s["per_query"]) != conditions or s["languages"] != langs or s["read"] != summaries[0]["read"]:
            raise ValueError(f"{o}: other conditions, questions or reader settings than {outputs[0]}")
    mean = {c: {q: {m: float(np.mean([s["per_query"][c][q][m] for s in summaries])) for m in MEASURES}
                for q in langs} for c in conditions}
    rounds = [c for c in conditions if c != "oracle"]
    pairs = [(rounds[-1], rounds[0])] if len(rounds) > 1 else []
    pairs += [("oracle", c) for c in rounds]
    out = {"seeds": list(outputs), "tables": {c: evaluate.by_language(mean[c], langs) for c in conditions},
           "differences": comparison(mean, langs, pairs, resamples),
           "per_seed": [{c: s["tables"][c]["avg"] for c in conditions} for s in summaries]}
    for row in out["differences"]:
        logging.info("seed mean %s - %s %s: %+.4f [%+.4f, %+.4f]", row["after"], row["before"], row["measure"],
                     row["mean"], row["low"], row["high"])
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.combine:
        atomic.write_json(os.path.join(f.output, "seeds.json"), combine_seeds(f.combine, int(f.config.resamples)))
        return
    if not f.run:
        raise app.UsageError("--run is required (or --combine)")
    run(f.config, f.run, f.output, [int(r) for r in f.rounds])


def define_flags() -> None:
    """Flags exist only when this module is the program (importing it defines none)."""
    config_flags.DEFINE_config_dict("config", default_config(), "reader and sampling settings")
    flags.DEFINE_string("run", None, "workdir of a finished xquad_r run")
    flags.DEFINE_string("output", None, "where answers and summary.json go (resumable)", required=True)
    flags.DEFINE_list("combine", [], "instead of reading: --output's of evaluations of runs that differ only in "
                      "their seed; writes their seed means and intervals to --output/seeds.json")
    flags.DEFINE_list("rounds", ["0", "2"], "rounds whose dev rankings the reader reads; the first is the "
                      "baseline of the paired comparison, the last the trained retriever")


if __name__ == "__main__":
    cli.run("umr_jax.xquad_r_qa", main, define_flags)
