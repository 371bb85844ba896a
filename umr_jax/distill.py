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
    # Which weights a round keeps. 'last': the final step's. 'average_rank': the official trainer's
    # selection (DPR's validate_average_rank, run `evals_per_epoch` times an epoch): `rank_queries`
    # teacher-scored training queries are held out (never trained on); each is scored against the pool
    # of every held-out query's teacher top-1 and next `rank_negatives` candidates, and the weights
    # whose teacher top-1 passages rank best on average are kept. No labels are used.
    cfg.select = "last"
    cfg.rank_queries = 0
    cfg.rank_negatives = 30
    cfg.evals_per_epoch = 4
    return cfg


SELECT_CHOICES = ("last", "average_rank")


def checked_select(cfg: ml_collections.ConfigDict) -> str:
    """train.select, one of SELECT_CHOICES ('last' in configs written before it existed)."""
    select = cfg.get("select", "last")
    if select not in SELECT_CHOICES:
        raise ValueError(f"train.select={select!r}: choose one of {SELECT_CHOICES}")
    return select


def heldout_count(num_queries: int, cfg: ml_collections.ConfigDict) -> int:
    """How many of `num_queries` teacher-scored queries checkpoint selection holds out (0 for 'last')."""
    if checked_select(cfg) == "last":
        return 0
    count = int(cfg.rank_queries)
    if not 0 < count < num_queries:
        raise ValueError(f"train.select='average_rank' holds out train.rank_queries={count} of the {num_queries} "
                         f"training queries: set it to 1..{num_queries - 1}")
    return count


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
    if checked_select(cfg) == "average_rank" and (int(cfg.rank_queries) < 1 or int(cfg.evals_per_epoch) < 1
                                         or int(cfg.rank_negatives) < 0):
        raise ValueError(f"train.select='average_rank' needs train.rank_queries >= 1 (is {cfg.rank_queries}), "
                         f"train.evals_per_epoch >= 1 (is {cfg.evals_per_epoch}) and train.rank_negatives >= 0 "
                         f"(is {cfg.rank_negatives})")


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
    """Training steps for `num_queries` teacher-scored queries (those held out for selection excepted)."""
    trained = num_queries - heldout_count(num_queries, cfg)
    return max(1, math.ceil(cfg.epochs * trained / cfg.queries_per_batch))


def split_heldout(data: TrainingSet, cfg: ml_collections.ConfigDict, seed: int) -> tuple[TrainingSet,
                                                                                        TrainingSet | None]:
    """The queries to train on, and those held out for checkpoint selection (a seeded sample; None if none)."""
    count = heldout_count(len(data.query_tokens), cfg)
    if not count:
        return data, None
    held = np.zeros(len(data.query_tokens), bool)
    held[np.random.default_rng([seed, 17]).choice(len(held), count, replace=False)] = True

    def subset(mask: np.ndarray) -> TrainingSet:
        return TrainingSet([t for t, m in zip(data.query_tokens, mask, strict=True) if m], data.passage_tokens,
                           data.candidates[mask], data.scores[mask])
    return subset(~held), subset(held)


def rank_pool(heldout: TrainingSet, negatives: int) -> np.ndarray:
    """(queries, 1 + negatives) passage indices: each held-out query's teacher top-1, then its next candidates
    in teacher order."""
    order = np.argsort(-heldout.scores, axis=1, kind="stable")[:, : negatives + 1]
    return np.take_along_axis(heldout.candidates, order, axis=1)


def average_rank(query_embeddings: np.ndarray, passage_embeddings: np.ndarray, heldout: TrainingSet,
                 negatives: int) -> float:
    """DPR's validate_average_rank with the teacher's top-1 as each query's gold passage.

    Each held-out query contributes its teacher top-1 and its next `negatives`
    candidates (in teacher order) to one pool; every query is scored against the
    whole pool, and the 0-based rank of its own top-1 entry (how many pool
    entries score higher) is averaged. `passage_embeddings` are indexed like
    `heldout.passage_tokens`.
    """
    pool = rank_pool(heldout, negatives)
    gold = np.arange(len(pool)) * pool.shape[1]
    scores = query_embeddings @ passage_embeddings[pool.reshape(-1)].T
    return float(np.mean(np.sum(scores > scores[np.arange(len(pool)), gold][:, None], axis=1)))



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


def _pad(tokens: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int,
         rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All of a step's texts at one bucketed length (a step is one program, so its rows share a shape), in
    `rows` rows (default: one per text)."""
    longest = max(len(t) for t in tokens)
    length = bucket_for(longest, sorted(int(x) for x in buckets)) if longest <= max(buckets) else longest
    return pad_rows(tokens, len(tokens) if rows is None else rows, length, pad_id)


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
        self._embed_fns: dict[str, Callable] = {}
        # train.select='average_rank': the best weights so far and their (average rank, step), checkpointed
        # with the rest so that a resumed run selects among every evaluation, not only its own.
        self.keep_best = checked_select(cfg) == "average_rank"
        if self.keep_best:
            self.best_params = jax.tree.map(lambda x: x.copy(), self.params)
            self.best = {"rank": np.array(np.inf), "step": np.array(-1)}  # 0-d arrays: what Orbax stores

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

    def sync_model(self, selected: bool = False) -> None:
        """Writes the trained parameters back into the model object: the last step's, or with `selected` the
        ones checkpoint selection kept (train.select)."""
        nnx.update(self.model, self.best_params if selected and self.keep_best else self.params)

    def embed(self, tokens: Sequence[Sequence[int]], tower: str, buckets: Sequence[int], pad_id: int,
              batch: int = 64) -> np.ndarray:
        """Embeddings of token sequences by one tower with the current parameters (no dropout), float32."""
        rows = sharding.batch_sharding(self.mesh, 2, self.rules)
        if tower not in self._embed_fns:
            graphdef, rest = self.graphdef, self.rest

            def run(params, frozen, ids, mask):
                return getattr(nnx.merge(graphdef, params, frozen, rest, copy=True), tower)(ids, mask,
                                                                                            deterministic=True)

            frozen_shardings = sharding.state_shardings(self.frozen, self.mesh, self.rules)
            self._embed_fns[tower] = jax.jit(run, in_shardings=(self.param_shardings, frozen_shardings, rows, rows),
                                             out_shardings=rows)
        multiple = sharding.data_parallel_size(self.mesh, self.rules)
        batch = -(-batch // multiple) * multiple
        parts = []
        for start in range(0, len(tokens), batch):
            chunk = tokens[start:start + batch]
            ids, mask = distributed.global_put(_pad(chunk, buckets, pad_id, rows=batch), (rows, rows))
            out = self._embed_fns[tower](self.params, self.frozen, ids, mask)
            parts.append(distributed.host_value(out)[: len(chunk)].astype(np.float32))
        return np.concatenate(parts)

    def evaluate_average_rank(self, heldout: TrainingSet, pad_id: int) -> float:
        """`average_rank` of the held-out queries with the current parameters (train.select='average_rank')."""
        used = np.unique(rank_pool(heldout, int(self.cfg.rank_negatives)))
        embedded = self.embed([heldout.passage_tokens[i] for i in used], "passage", self.cfg.passage_buckets, pad_id)
        passages = np.zeros((len(heldout.passage_tokens), embedded.shape[1]), np.float32)
        passages[used] = embedded
        queries = self.embed(heldout.query_tokens, "query", self.cfg.query_buckets, pad_id)
        return average_rank(queries, passages, heldout, int(self.cfg.rank_negatives))

    def consider(self, rank: float, step: int) -> bool:
        """Keeps the current parameters if `rank` beats the best so far (strictly, as the official trainer)."""
        if not rank < self.best["rank"]:
            return False
        self.best_params = jax.tree.map(lambda x: x.copy(), self.params)
        self.best = {"rank": np.array(float(rank)), "step": np.array(int(step))}
        return True

    # ------------------------------------------------------------- checkpoints

    def _checkpoint_items(self) -> dict:
        items = {"params": self.params.to_pure_dict(), "opt_state": self.opt_state}
        if self.keep_best:
            items.update(best_params=self.best_params.to_pure_dict(), best=self.best)
        return items

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
        if self.keep_best:
            nnx.replace_by_pure_dict(self.best_params, restored["best_params"])
            self.best_params = jax.device_put(self.best_params, self.param_shardings)
            best = restored["best"]
            self.best = {"rank": np.array(float(best["rank"])), "step": np.array(int(best["step"]))}


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
    data, heldout = split_heldout(data, cfg, seed)
    trainer = Trainer(model, cfg, mesh, total, seed)
    # As the official trainer: evaluations evals_per_epoch times an epoch of training queries, and at the end.
    eval_every = max(1, math.ceil(len(data.query_tokens) / cfg.queries_per_batch / int(cfg.evals_per_epoch)))
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
            if heldout is not None and ((s + 1) % eval_every == 0 or s + 1 == total):
                rank = trainer.evaluate_average_rank(heldout, pad_id)
                kept = trainer.consider(rank, s + 1)
                logging.info("%s: step %d, average rank of the teacher's top-1 on %d held-out queries %.3f%s", desc,
                             s + 1, len(heldout.query_tokens), rank, " (best so far: kept)" if kept else "")
                if log_scalars:
                    log_scalars("train/average_rank", rank, s)
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
    trainer.sync_model(selected=True)
    elapsed = time.perf_counter() - began
    summary = {"steps": total, "resumed_at": start_step, "seconds": elapsed,
               "first_loss": losses[0] if losses else float("nan"),
               "last_loss": losses[-1] if losses else float("nan")}
    if trainer.keep_best:
        summary.update(average_rank=float(trainer.best["rank"]), selected_step=int(trainer.best["step"]))
        logging.info("%s: kept the weights of step %d of %d (average rank %.3f)", desc, summary["selected_step"],
                     total, summary["average_rank"])
    return summary


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
    trainer.sync_model(selected=True)
