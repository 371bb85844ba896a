"""Step 4 of a UMR round: distil the teacher's scores into the two retriever towers.

Per step, B queries each bring n passages sampled (shuffled) from their
teacher-scored top-k. The teacher distribution of query i is
log_softmax(temperature x score) over its own n passages; the student scores
query i against all B x n passages of the batch (in-batch negatives), and
other queries' passages get teacher logit -1000 (probability ~0). The loss is
KL(teacher || student), averaged over the batch (docs/algorithm.md, step 4).

Everything a resumed run needs is a function of the step number: the batch of
step s is fixed by (seed, s) and the dropout key is fold_in(seed, s). An Orbax
checkpoint therefore holds only parameters, optimizer state and the step, and
a run killed mid-training ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from umr_jax import atomic, distributed, faults, preemption, sharding
from umr_jax.batching import bucket_for, fill_packed, pack_rows, pad_rows

TEACHER_MASK_LOGIT = -1000.0  # the official code's value for other queries' passages


def default_config() -> ml_collections.ConfigDict:
    """Training section of a run config; defaults = the official UMR hyperparameters."""
    cfg = ml_collections.ConfigDict()
    cfg.queries_per_batch = 16  # B (global batch, all devices)
    cfg.passages_per_query = 16  # n, sampled without replacement from each query's top-k
    cfg.temperature = 10.0  # multiplies the teacher scores before log_softmax (official)
    # Multiplies the student's dot products. 1 for mContriever (unnormalised
    # embeddings); an L2-normalised retriever such as e5 needs its training
    # temperature's inverse (e5: 1 / 0.01 = 100), else cosines in [-1, 1] give
    # a near-uniform student distribution.
    cfg.student_scale = 1.0
    cfg.epochs = 10.0  # passes over the training queries (fractions allowed)
    cfg.learning_rate = 2e-5
    cfg.adam_eps = 1e-8
    cfg.weight_decay = 0.0
    cfg.warmup_steps = 1237  # linear warmup, then linear decay to 0 (capped at the total steps)
    cfg.max_grad_norm = 2.0
    # Gradients are multiplied by this before clipping. The official grad-cache
    # path multiplies them by world_size / 8 (1/8 for the UMR README's
    # single-process command): with AdamW, which ignores a constant scale, that
    # amounts to clipping at max_grad_norm / grad_scale.
    cfg.grad_scale = 1.0
    # Parameter names (path parts) to keep fixed, e.g. ('word',) for the word
    # embeddings: 250k-row tables are most of a multilingual encoder's
    # parameters, and on a CPU their dense gradients and Adam updates cost more
    # than the rest of a small step. () = train everything (the paper).
    cfg.freeze = ()
    # Micro-batches per step: a global batch that does not fit is split into
    # this many parts whose gradients are averaged. In-batch negatives are then
    # those of each micro-batch.
    cfg.accumulation_steps = 1
    # Drop one trailing ASCII "?" from training questions, as the official
    # code's DPR biencoder does (normalize_question) when it builds training
    # batches; retrieval and evaluation use the questions as they are.
    cfg.strip_question_mark = False
    # Padded lengths (one compiled program per (query, passage) bucket pair).
    cfg.query_buckets = (32, 64)
    cfg.passage_buckets = (64, 128, 256)  # with packing=False
    # Passages packed several to a row (block-diagonal attention, positions
    # restarting per passage: each gets the embedding it gets alone) instead of
    # each padded to the step's longest: short passages cost their own length,
    # not the bucket's (2x faster steps on XQuAD-R sentences). Rows of
    # pack_row_length tokens (>= the retriever's max_passage_length), at most
    # pack_max_segments passages each; the number of rows is fixed per run
    # (one compiled step), see `packing_plan`.
    cfg.packing = True
    cfg.pack_row_length = 256
    cfg.pack_max_segments = 16
    cfg.checkpoint_every = 200  # steps between Orbax checkpoints (and at the end)
    cfg.checkpoints_to_keep = 2
    cfg.log_every = 10  # steps between TensorBoard / log lines
    return cfg


def training_question(text: str, cfg: ml_collections.ConfigDict) -> str:
    """A training question as the student's query tower sees it (see `strip_question_mark`)."""
    return text[:-1] if cfg.get("strip_question_mark", False) and text.endswith("?") else text


def validate_config(cfg: ml_collections.ConfigDict, k: int) -> None:
    if cfg.passages_per_query > k:
        raise ValueError(f"train.passages_per_query={cfg.passages_per_query} exceeds k={k} retrieved passages")
    if cfg.queries_per_batch % cfg.accumulation_steps:
        raise ValueError(f"train.queries_per_batch={cfg.queries_per_batch} is not divisible by "
                         f"train.accumulation_steps={cfg.accumulation_steps}")
    for key in ("queries_per_batch", "passages_per_query", "accumulation_steps", "checkpoint_every", "log_every",
                "pack_row_length", "pack_max_segments"):
        if int(cfg[key]) < 1:
            raise ValueError(f"train.{key}={cfg[key]} must be >= 1")
    if cfg.epochs <= 0 or cfg.learning_rate <= 0:
        raise ValueError(f"train.epochs={cfg.epochs} and train.learning_rate={cfg.learning_rate} must be > 0")


# ----------------------------------------------------------------------------- the loss


def distill_loss(query_emb: jax.Array, passage_emb: jax.Array, teacher_scores: jax.Array,
                 temperature: float, student_scale: float = 1.0) -> jax.Array:
    """KL(teacher || student), batch mean.

    query_emb (B, d); passage_emb (B * n, d), query i's passages at rows
    i * n .. i * n + n - 1; teacher_scores (B, n).
    """
    b, n = teacher_scores.shape
    student = jnp.einsum("qd,pd->qp", query_emb.astype(jnp.float32), passage_emb.astype(jnp.float32))
    student = jax.nn.log_softmax(student * student_scale, axis=-1)
    own = (jnp.arange(b * n) // n)[None, :] == jnp.arange(b)[:, None]
    teacher = jnp.where(own, jnp.tile(teacher_scores.astype(jnp.float32), (1, b)) * temperature,
                        TEACHER_MASK_LOGIT)
    teacher = jax.nn.log_softmax(teacher, axis=-1)
    # optax's KL sums exp(teacher) * (teacher - student) over the last axis,
    # one value per query; the official loss is their mean.
    return optax.losses.kl_divergence_with_log_targets(student, teacher).mean()


def batch_loss(model: nnx.Module, micro: dict[str, jax.Array], cfg: ml_collections.ConfigDict, *,
               deterministic: bool) -> jax.Array:
    """The distillation loss of one micro-batch of `make_batch` (its arrays without the accumulation axis):
    both towers, packed or padded passages as `cfg.packing` says."""
    q = model.query(micro["query_ids"], micro["query_mask"], deterministic=deterministic)
    if cfg.packing:
        p = model.passage.packed(micro["passage_ids"], micro["passage_segments"], micro["passage_positions"],
                                 int(cfg.pack_max_segments), deterministic=deterministic)
        p = p.reshape(-1, p.shape[-1])[micro["passage_slots"]]
    else:
        p = model.passage(micro["passage_ids"], micro["passage_mask"], deterministic=deterministic)
    return distill_loss(q, p, micro["scores"], float(cfg.temperature), float(cfg.student_scale))


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                             optax.Schedule]:
    """AdamW with linear warmup and linear decay to zero, after global-norm clipping (of the scaled gradients)."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
        optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1)),
    ], [warmup]) if warmup else optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps, 1))
    scale = float(cfg.get("grad_scale", 1.0))
    # No scale stage at 1.0: the optimizer state (and so its checkpoints) keep their structure.
    tx = optax.chain(*([optax.scale(scale)] if scale != 1.0 else []), optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))
    return tx, schedule


# ----------------------------------------------------------------------------- the data


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """Teacher-scored retrievals: query i's candidates are passage_ids[i], scored scores[i]."""

    query_tokens: list[list[int]]
    passage_tokens: list[list[int]]  # unique passages, indexed by `candidates`
    candidates: np.ndarray  # (queries, k) indices into passage_tokens
    scores: np.ndarray  # (queries, k) teacher scores

    def __post_init__(self) -> None:
        if self.candidates.shape != self.scores.shape or len(self.candidates) != len(self.query_tokens):
            raise ValueError(f"{len(self.query_tokens)} queries, candidates {self.candidates.shape}, "
                             f"scores {self.scores.shape}")
        if not np.all(np.isfinite(self.scores)):
            raise ValueError("teacher scores contain NaN or Inf")


def steps_for(num_queries: int, cfg: ml_collections.ConfigDict) -> int:
    return max(1, math.ceil(cfg.epochs * num_queries / cfg.queries_per_batch))


def step_selection(num_queries: int, k: int, step: int, cfg: ml_collections.ConfigDict,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which queries and which of their k candidates step `step` trains on.

    Queries come from a stream of per-epoch permutations, so every query is
    used once per epoch and no remainder is dropped (the last batch of an
    epoch continues into the next permutation). A pure function of
    (seed, step): resuming needs no iterator state.
    """
    b, n = int(cfg.queries_per_batch), int(cfg.passages_per_query)
    start = step * b
    positions = np.arange(start, start + b)
    epochs = positions // num_queries
    queries = np.empty(b, np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, 1, int(epoch)]).permutation(num_queries)
        queries[epochs == epoch] = order[positions[epochs == epoch] % num_queries]
    rng = np.random.default_rng([seed, 2, step])
    picks = np.stack([rng.permutation(k)[:n] for _ in range(b)])
    return queries, picks


def _pad(tokens: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """All of a step's texts at one bucketed length: a step is one program, so its rows share a shape."""
    longest = max(len(t) for t in tokens)
    length = bucket_for(longest, sorted(int(x) for x in buckets)) if longest <= max(buckets) else longest
    return pad_rows(tokens, len(tokens), length, pad_id)


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """The fixed shape of packed passage rows: `rows` per micro-batch, of `row_length` tokens."""

    rows: int
    row_length: int
    max_segments: int
    multiple_of: int  # rows are split over this many data-parallel devices


def _micro_batch_passages(data: TrainingSet, step: int, cfg: ml_collections.ConfigDict,
                          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step `step`'s queries, their picked candidates, and the passage indices per micro-batch (a, B/a * n)."""
    queries, picks = step_selection(len(data.query_tokens), data.candidates.shape[1], step, cfg, seed)
    passages = data.candidates[queries[:, None], picks]  # (B, n)
    return queries, picks, passages.reshape(int(cfg.accumulation_steps), -1)


def _packed_rows(data: TrainingSet, passages: np.ndarray, cfg: ml_collections.ConfigDict) -> list[list[int]]:
    lengths = np.array([len(data.passage_tokens[p]) for p in passages], np.int64)
    longest = int(lengths.max())
    if longest > cfg.pack_row_length:
        raise ValueError(f"train.pack_row_length={cfg.pack_row_length} is shorter than a training passage of "
                         f"{longest} tokens; make it at least the retriever's max_passage_length")
    return [texts for _, texts in pack_rows(lengths, [int(cfg.pack_row_length)], int(cfg.pack_max_segments))]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packing_plan(data: TrainingSet, cfg: ml_collections.ConfigDict, seed: int, total_steps: int,
                 multiple_of: int = 1, sample: int = 256) -> PackingPlan:
    """Rows enough for every micro-batch of (an even sample of at most `sample`) steps.

    One row count for the run means one compiled step. It is a function of
    the data, the config and the seed only, so a resumed run packs exactly as
    an uninterrupted one (dropout keys are drawn per shape, so this matters for
    bit-identical resumption). A step outside the sample that needs more rows
    gets its own deterministic shape (`make_batch`).
    """
    steps = np.unique(np.linspace(0, total_steps - 1, min(total_steps, sample)).astype(np.int64))
    need = max(len(_packed_rows(data, m, cfg)) for s in steps for m in _micro_batch_passages(data, int(s), cfg,
                                                                                               seed)[2])
    return PackingPlan(_round_up(need, multiple_of), int(cfg.pack_row_length), int(cfg.pack_max_segments),
                       multiple_of)


def _pack(data: TrainingSet, passages: np.ndarray, rows: list[list[int]], size: int,
          plan: PackingPlan, pad_id: int) -> dict[str, np.ndarray]:
    """One micro-batch's passages in `size` packed rows, and where each passage's embedding lands (its slot)."""
    tokens = [data.passage_tokens[p] for p in passages]
    packed = fill_packed(tokens, rows, size, plan.row_length, plan.max_segments, pad_id)
    slots = np.empty(len(passages), np.int32)
    flat = packed.rows.reshape(-1)
    slots[flat[flat >= 0]] = np.flatnonzero(flat >= 0)
    return {"passage_ids": packed.ids, "passage_segments": packed.segments, "passage_positions": packed.positions,
            "passage_slots": slots}


def make_batch(data: TrainingSet, step: int, cfg: ml_collections.ConfigDict, seed: int, pad_id: int,
               plan: PackingPlan | None = None) -> dict[str, np.ndarray]:
    """Host arrays of one step, shaped (accumulation, micro-batch, ...).

    With cfg.packing, passages come as packed rows (`plan`, default: the rows
    this step needs) plus `passage_slots`: passage j of the micro-batch is
    segment slots[j] % max_segments of row slots[j] // max_segments.
    """
    queries, picks, micro = _micro_batch_passages(data, step, cfg, seed)
    a = int(cfg.accumulation_steps)
    b = len(queries)
    q_ids, q_mask = _pad([data.query_tokens[q] for q in queries], cfg.query_buckets, pad_id)
    batch = {"query_ids": q_ids.reshape(a, b // a, -1), "query_mask": q_mask.reshape(a, b // a, -1),
             "scores": data.scores[queries[:, None], picks].astype(np.float32).reshape(a, b // a, -1)}
    if not cfg.packing:
        p_ids, p_mask = _pad([data.passage_tokens[p] for p in micro.reshape(-1)], cfg.passage_buckets, pad_id)
        return {**batch, "passage_ids": p_ids.reshape(a, micro.shape[1], -1),
                "passage_mask": p_mask.reshape(a, micro.shape[1], -1)}
    plan = plan or PackingPlan(0, int(cfg.pack_row_length), int(cfg.pack_max_segments), 1)
    rows = [_packed_rows(data, m, cfg) for m in micro]
    # The plan's rows, unless this step needs more (one shape for all its micro-batches).
    size = max(plan.rows, _round_up(max(len(r) for r in rows), plan.multiple_of))
    parts = [_pack(data, m, r, size, plan, pad_id) for m, r in zip(micro, rows, strict=True)]
    return {**batch, **{k: np.stack([p[k] for p in parts]) for k in parts[0]}}


def batch_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    passages = (("passage_ids", "passage_segments", "passage_positions", "passage_slots") if cfg.packing
                else ("passage_ids", "passage_mask"))
    return ("query_ids", "query_mask", *passages, "scores")


# ----------------------------------------------------------------------------- the step


class NumericFaultError(FloatingPointError):
    pass


def with_dropout_keys(rest: nnx.State, key: jax.Array) -> nnx.State:
    """The model's RNG streams with fresh keys derived from `key` (one per stream).

    A functional reseed: the new state is an argument of the differentiated
    function, so the dropout layers may advance their counters inside it.
    """
    leaves, treedef = jax.tree.flatten(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
    leaves = [v.replace(jax.random.fold_in(key, i)) if isinstance(v, nnx.RngKey) else v.replace(v.get_value())
              for i, v in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


class Trainer:
    """The jitted train step of a dual encoder on a mesh, and the loop with Orbax checkpoints."""

    def __init__(self, model: nnx.Module, cfg: ml_collections.ConfigDict, mesh, total_steps: int, seed: int,
                 rules=sharding.DEFAULT_RULES):
        self.model, self.cfg, self.mesh, self.rules = model, cfg, mesh, rules
        self.total_steps, self.seed = total_steps, seed
        micro = int(cfg.queries_per_batch) // int(cfg.accumulation_steps)
        if micro % sharding.data_parallel_size(mesh, rules):
            raise ValueError(f"train.queries_per_batch / train.accumulation_steps = {micro} queries per "
                             f"micro-batch cannot be split over the {sharding.data_parallel_size(mesh, rules)} "
                             "data-parallel devices; make it a multiple")
        frozen = (nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(k) for k in cfg.freeze])) if cfg.freeze
                  else nnx.Nothing)
        self.trainable = nnx.All(nnx.Param, nnx.Not(frozen))
        self.graphdef, self.params, self.frozen, self.rest = nnx.split(model, self.trainable, frozen, ...)
        if cfg.freeze and not jax.tree.leaves(self.frozen):
            raise ValueError(f"train.freeze={tuple(cfg.freeze)} matches no parameter")
        self.tx, self.schedule = make_optimizer(cfg, total_steps)
        self.param_shardings = sharding.state_shardings(self.params, mesh, rules)
        # The mesh may span other processes' devices (multi-host training): place
        # the (identical on every process) weights there explicitly.
        self.params = distributed.global_put(self.params, self.param_shardings)
        self.frozen = distributed.global_put(self.frozen, sharding.state_shardings(self.frozen, mesh, rules))
        self.opt_state = self.tx.init(self.params)
        # Adam moments follow their parameters' shardings; scalars (step
        # counts) are replicated over the mesh.
        replicated = NamedSharding(mesh, PartitionSpec())
        self.opt_shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, self.opt_state)
        self.opt_state = jax.device_put(self.opt_state, self.opt_shardings)
        self.batch_sharding = sharding.stacked_batch_sharding(mesh, rules)
        self._step_fn = self._build_step()

    def _build_step(self) -> Callable:
        graphdef, rest, cfg, tx = self.graphdef, self.rest, self.cfg, self.tx

        def micro_loss(model, micro):
            return batch_loss(model, micro, cfg, deterministic=False)

        grad_fn = nnx.value_and_grad(micro_loss, argnums=nnx.DiffState(0, self.trainable))

        # The seed is an argument, not a constant of the program: every round
        # (its own seed) then reuses the one compiled step from the XLA cache.
        def step(params, opt_state, frozen, batch, step_index, seed):
            key = jax.random.fold_in(jax.random.key(seed), step_index)

            def accumulate(carry, micro_and_index):
                micro, i = micro_and_index
                # Built inside this trace, with this micro-batch's dropout keys.
                model = nnx.merge(graphdef, params, frozen, with_dropout_keys(rest, jax.random.fold_in(key, i)),
                                  copy=True)
                loss, grads = grad_fn(model, micro)
                total_loss, total_grads = carry
                return (total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)), None

            count = batch["scores"].shape[0]
            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                            (batch, jnp.arange(count)))
            loss, grads = loss / count, jax.tree.map(lambda g: g / count, grads)
            grad_norm = optax.global_norm(grads)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            return new_params, new_opt_state, {"loss": loss, "grad_norm": grad_norm}

        batch_shardings = {k: self.batch_sharding for k in batch_keys(cfg)}
        frozen_shardings = sharding.state_shardings(self.frozen, self.mesh, self.rules)
        return jax.jit(step, in_shardings=(self.param_shardings, self.opt_shardings, frozen_shardings,
                                           batch_shardings, None, None),
                       out_shardings=(self.param_shardings, self.opt_shardings, None), donate_argnums=(0, 1))

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Every process builds the same global batch from (seed, step) and places its devices' rows."""
        return distributed.global_put(batch, {k: self.batch_sharding for k in batch})

    def step(self, batch: dict[str, np.ndarray], step_index: int) -> dict[str, float]:
        self.params, self.opt_state, metrics = self._step_fn(self.params, self.opt_state, self.frozen,
                                                             self.put_batch(batch), np.int32(step_index),
                                                             np.uint32(self.seed))
        return {k: float(v) for k, v in metrics.items()}

    def sync_model(self) -> None:
        """Writes the trained parameters back into the model object."""
        nnx.update(self.model, self.params)

    # ------------------------------------------------------------- checkpoints

    def _checkpoint_items(self) -> dict:
        return {"params": self.params.to_pure_dict(), "opt_state": self.opt_state}

    def fingerprint(self) -> dict:
        """What this trainer's checkpoints are checked against: the train config (without bookkeeping keys),
        the seed, the total steps and the trained parameters' dtypes and shapes; `hash` sums them up."""
        train = {k: v for k, v in json.loads(self.cfg.to_json_best_effort()).items() if k not in _BOOKKEEPING_KEYS}
        params = {jax.tree_util.keystr(path, simple=True, separator="/"): f"{x.dtype}{list(x.shape)}"
                  for path, x in jax.tree_util.tree_flatten_with_path(self.params.to_pure_dict())[0]}
        parts = {"train": train, "seed": int(self.seed), "total_steps": int(self.total_steps), "params": params}
        return {"hash": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], **parts}

    def check_checkpoints(self, directory: str) -> None:
        """Raises CheckpointMismatchError if `directory` holds another setup's checkpoints (by their fingerprint
        file; a directory without one, e.g. of an older version, is not checked here)."""
        path = os.path.join(directory, CHECKPOINT_FINGERPRINT)
        try:
            saved = atomic.read_json(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise CheckpointMismatchError(f"{path}: unreadable ({e}): {_redo_checkpoints(directory)}") from None
        ours = self.fingerprint()
        if not isinstance(saved, dict) or saved.get("hash") != ours["hash"]:
            raise CheckpointMismatchError(f"{directory}: these checkpoints were written for another training setup "
                                          f"({_fingerprint_changes(saved, ours)}): {_redo_checkpoints(directory)}")

    def _record_fingerprint(self, directory: str) -> None:
        path, ours = os.path.join(directory, CHECKPOINT_FINGERPRINT), self.fingerprint()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if atomic.read_json(path).get("hash") == ours["hash"]:
                return
        atomic.write_json(path, ours)

    def save(self, manager: ocp.CheckpointManager, step: int) -> None:
        if distributed.is_primary():  # the fingerprint of the directory's checkpoints, before the first one
            self._record_fingerprint(str(manager.directory))
        manager.save(step, args=ocp.args.StandardSave(self._checkpoint_items()), force=True)
        manager.wait_until_finished()

    def restore(self, manager: ocp.CheckpointManager, step: int) -> None:
        """Restores step `step`; a checkpoint of another setup is a CheckpointMismatchError (`manager` closed)."""
        directory = str(manager.directory)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._checkpoint_items())
        try:
            self.check_checkpoints(directory)
            _check_stored_arrays(manager, step, target)  # before Orbax starts reading (and fails mid-way)
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            with contextlib.suppress(Exception):
                manager.close()  # else Orbax's threads complain at exit
            if isinstance(e, CheckpointMismatchError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")[:200]
            raise CheckpointMismatchError(f"{directory}: step {step} does not restore into this model ({first}): "
                                          f"{_redo_checkpoints(directory)}") from None
        nnx.replace_by_pure_dict(self.params, restored["params"])
        self.params = jax.device_put(self.params, self.param_shardings)  # restored on these shardings already
        self.opt_state = jax.device_put(restored["opt_state"], self.opt_shardings)


# Beside the Orbax steps: the fingerprint of the setup that wrote them (Trainer.fingerprint).
CHECKPOINT_FINGERPRINT = "umr_jax-fingerprint.json"
# Train keys that do not change what a checkpoint holds, only how often it is written or logged.
_BOOKKEEPING_KEYS = ("checkpoint_every", "checkpoints_to_keep", "log_every")


class CheckpointMismatchError(ValueError):
    """A checkpoint directory of another training setup (config, seed, steps, model shapes), e.g. copied in."""


def _redo_checkpoints(directory: str) -> str:
    return (f"delete {directory} (and, if manifest.json records its training stage as done, that entry) to train "
            "again, or use a new --workdir")


def _check_stored_arrays(manager: ocp.CheckpointManager, step: int, target) -> None:
    """Raises CheckpointMismatchError unless step `step` stores arrays of `target`'s names, shapes and dtypes."""
    def arrays(tree) -> dict[str, str]:
        return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{x.dtype}{list(x.shape)}"
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}

    stored, wanted = arrays(manager.item_metadata(step)), arrays(target)
    differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if differ:
        name = differ[0]
        raise CheckpointMismatchError(
            f"{manager.directory}: step {step} does not fit this model ({len(differ)} arrays differ, e.g. {name}: "
            f"stored {stored.get(name, 'nothing')}, this model {wanted.get(name, 'nothing')}): "
            f"{_redo_checkpoints(str(manager.directory))}")


def _fingerprint_changes(saved, ours: dict) -> str:
    """What differs between two fingerprints, briefly: 'train.epochs: 3.0 -> 2.0; seed: 5 -> 6; ...'."""
    if not isinstance(saved, dict):
        return f"the fingerprint is a {type(saved).__name__}"
    changes = []
    old, new = saved.get("train") or {}, ours["train"]
    changes += [f"train.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                if old.get(k) != new.get(k)]
    changes += [f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in ("seed", "total_steps") if saved.get(k) != ours[k]]
    old, new = saved.get("params") or {}, ours["params"]
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        changes.append(f"{len(differ)} parameters differ, e.g. {differ[0]}: {old.get(differ[0], 'absent')} -> "
                       f"{new.get(differ[0], 'absent')}")
    return "; ".join(changes[:4]) or "fingerprint hash differs"


def checkpoint_manager(directory: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=int(cfg.checkpoints_to_keep), create=True,
                                           enable_async_checkpointing=False)
    # The handler named up front (not only by the first save or restore): a step's metadata is readable
    # before restoring it (`_check_stored_arrays`).
    return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def train(model: nnx.Module, data: TrainingSet, cfg: ml_collections.ConfigDict, mesh, checkpoint_dir: str, *,
          seed: int, pad_id: int, log_scalars: Callable[[str, float, int], None] | None = None,
          desc: str = "train", stop_at: int | None = None) -> dict[str, float]:
    """Trains `model` in place to the configured number of steps, resuming from the last checkpoint.

    `stop_at` ends the loop early after checkpointing that step (a planned
    interruption; tests use it). Returns summary numbers (steps, first/last
    loss, seconds). A NaN or
    Inf loss or gradient stops the run with NumericFaultError before anything is
    saved, so the last checkpoint stays the last good state.
    """
    total = steps_for(len(data.query_tokens), cfg)
    trainer = Trainer(model, cfg, mesh, total, seed)
    plan = packing_plan(data, cfg, seed, total, sharding.data_parallel_size(mesh)) if cfg.packing else None
    if plan:
        logging.info("%s: passages packed into %d rows of %d tokens per micro-batch", desc, plan.rows,
                     plan.row_length)
    manager = checkpoint_manager(checkpoint_dir, cfg)
    start_step = 0
    latest = manager.latest_step()
    if latest is not None:
        trainer.restore(manager, latest)
        start_step = latest
        logging.info("%s: resumed from the checkpoint at step %d of %d", checkpoint_dir, latest, total)
    began = time.perf_counter()
    losses: list[float] = []
    with tqdm(total=total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for s in range(start_step, total if stop_at is None else min(stop_at, total)):
            faults.point("train.step_started")
            metrics = trainer.step(make_batch(data, s, cfg, seed, pad_id, plan), s)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise NumericFaultError(f"step {s}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
                                   f"stopped, the last good checkpoint in {checkpoint_dir} is step "
                                   f"{manager.latest_step()}")
            losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if log_scalars and (s % cfg.log_every == 0 or s == total - 1):
                log_scalars("train/loss", metrics["loss"], s)
                log_scalars("train/grad_norm", metrics["grad_norm"], s)
                log_scalars("train/learning_rate", float(trainer.schedule(s)), s)
            preempted = preemption.agreed()  # every process, every step: all stop at the same step
            if preempted or (s + 1) % cfg.checkpoint_every == 0 or s + 1 in (total, stop_at):
                trainer.save(manager, s + 1)
                faults.point("train.checkpoint_saved")
            if preempted and s + 1 < total:
                manager.close()
                raise preemption.Preempted(f"{preemption.requested() or 'a notice to another process'} received: "
                                           f"stopped after step {s + 1} of {total}, checkpoint saved in "
                                           f"{checkpoint_dir}")
    manager.close()
    trainer.sync_model()
    elapsed = time.perf_counter() - began
    return {"steps": total, "resumed_at": start_step, "seconds": elapsed,
            "first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan")}


def restore_final(model: nnx.Module, cfg: ml_collections.ConfigDict, mesh, checkpoint_dir: str, num_queries: int,
                  seed: int) -> None:
    """Loads a finished training stage's final parameters into `model`."""
    total = steps_for(num_queries, cfg)
    trainer = Trainer(model, cfg, mesh, total, seed)
    trainer.check_checkpoints(checkpoint_dir)  # another setup's checkpoints: say so, not "no final step"
    manager = checkpoint_manager(checkpoint_dir, cfg)
    latest = manager.latest_step()
    if latest != total:
        manager.close()
        found = "none" if latest is None else f"step {latest}"
        raise FileNotFoundError(f"{checkpoint_dir}: expected the final checkpoint at step {total}, found {found}: "
                                f"{_redo_checkpoints(checkpoint_dir)}")
    trainer.restore(manager, total)
    manager.close()
    trainer.sync_model()
