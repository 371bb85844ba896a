"""Text generation in JAX: greedy and beam search over a key/value cache, for Gemma 3 and mT5.

What the reader stage needs from its LM, compiled once per padded shape:

  * decoder-only (Gemma 3): the right-padded prompts are prefilled in one call
    that writes every layer's keys and values into a cache; each step then
    feeds one token per row at that row's own position (prompt length + step),
    so rows of different prompt lengths decode together without left padding;
  * encoder-decoder (mT5): the encoder runs once, every decoder layer's
    cross-attention keys/values are computed once, and each step feeds one
    token against the growing self-attention cache.

The search loops are ``lax.while_loop`` programs with fixed shapes (the output
is ``max_new_tokens`` wide, padded after end-of-sequence) that stop as soon as
every row is done, so a batch whose answers are short costs short. They follow
``transformers``' ``generate`` step for step (its greedy path, and its
vectorised beam search: the 2K candidates, the -1e9 masks, the length penalty
on finished hypotheses and the ``early_stopping`` heuristic), which is what
the parity tests check token for token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from umr_jax import sharding
from umr_jax.models.gemma import Gemma3
from umr_jax.models.t5 import MT5, DecoderCache

_NEG = -1.0e9  # transformers' mask value in beam search; float32 like theirs


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How to decode; hashable, so one compiled program serves every batch of a shape.

    `early_stopping` takes transformers' values: False (its default
    heuristic), True (stop once `num_beams` hypotheses finished) or 'never'.
    """

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # (a, b): token b may not follow token a, transformers' ``bad_words_ids=[[a, b]]``.
    # mGEN decodes with [[0, 0]]: mT5's pad, which is also its decoder start, never comes first.
    banned_bigram: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be positive, got {self.num_beams}")
        if not self.eos_ids:
            raise ValueError("eos_ids is empty: generation would never stop before max_new_tokens")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generated:
    """Per row: the new tokens (pad after the first end-of-sequence), their count, and the
    sequence score (beam search: the length-penalised log-probability; greedy: the sum of
    the chosen tokens' log-probabilities)."""

    tokens: jax.Array  # (batch, max_new_tokens) int32
    lengths: jax.Array  # (batch,) int32, end-of-sequence included
    scores: jax.Array  # (batch,) float32


# A step feeds token i of every row (batch,) and returns the next logits (batch, vocab)
# and the new state. The state is a pair (fixed, cache): `fixed` holds what all beams of
# one input share and no step changes (prompt lengths, mT5's cross-attention keys and
# values), so beam search never reorders it (reordering within an input's beams would
# copy it unchanged, every step); `cache` holds what each hypothesis owns.
StepFn = Callable[[tuple[Any, Any], jax.Array, jax.Array], tuple[jax.Array, tuple[Any, Any]]]


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


def _ban(scores: jax.Array, previous: jax.Array, settings: SearchSettings) -> jax.Array:
    """-inf for the banned token in rows whose previous token starts the banned bigram."""
    if settings.banned_bigram is None:
        return scores
    first, second = settings.banned_bigram
    banned = (previous == first)[:, None] & (jnp.arange(scores.shape[-1]) == second)[None, :]
    return jnp.where(banned, -jnp.inf, scores)


def greedy_search(first_logits: jax.Array, cache: Any, step: StepFn, settings: SearchSettings,
                  previous: jax.Array) -> Generated:
    """transformers' greedy decoding: argmax, pad once a row has ended, stop when all have.

    `previous` (batch,) is the token before the first new one (the prompt's
    last, or the decoder start), which :attr:`SearchSettings.banned_bigram` needs.
    """
    batch, steps = first_logits.shape[0], settings.max_new_tokens
    tokens = jnp.full((batch, steps), settings.pad_id, jnp.int32)

    def cond(carry):
        i, _, finished, *_ = carry
        return (i < steps) & ~jnp.all(finished)

    def body(carry):
        i, tokens, finished, scores, logits, cache = carry
        previous_token = jnp.where(i == 0, previous, jax.lax.dynamic_index_in_dim(tokens, i - 1, 1, False))
        logits = _ban(logits.astype(jnp.float32), previous_token, settings)
        logp = jax.nn.log_softmax(logits, axis=-1)
        choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        chosen = jnp.where(finished, settings.pad_id, choice)
        scores = scores + jnp.where(finished, 0.0, jnp.take_along_axis(logp, choice[:, None], axis=-1)[:, 0])
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], i, axis=1)
        finished = finished | _is_eos(chosen, settings.eos_ids)
        more = (i + 1 < steps) & ~jnp.all(finished)
        logits, cache = jax.lax.cond(more, lambda: step(cache, chosen, i), lambda: (logits, cache))
        return i + 1, tokens, finished, scores, logits, cache

    init = (jnp.int32(0), tokens, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32), first_logits, cache)
    _, tokens, _, scores, _, _ = jax.lax.while_loop(cond, body, init)
    return Generated(tokens, _lengths(tokens, settings), scores)


def _lengths(tokens: jax.Array, settings: SearchSettings) -> jax.Array:
    """New tokens per row up to and including the first end-of-sequence (all of them if none)."""
    eos = _is_eos(tokens, settings.eos_ids)
    first = jnp.argmax(eos, axis=-1)
    return jnp.where(eos.any(-1), first + 1, tokens.shape[1]).astype(jnp.int32)


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, j], ...] for (batch, beams, ...) arrays (transformers' _gather_beams)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(first_logits: jax.Array, cache: Any, step: StepFn, settings: SearchSettings,
                previous: jax.Array) -> Generated:
    """transformers' vectorised beam search (``GenerationMixin._beam_search``) with a reordered cache.

    `first_logits` and `cache` have one row per batch item; they are repeated
    to `num_beams` rows each here (what transformers does to its inputs
    before prefilling, at a `num_beams`-th of the prefill cost).
    """
    beams, steps = settings.num_beams, settings.max_new_tokens
    batch, vocab = first_logits.shape
    keep = max(2, 1 + len(settings.eos_ids)) * beams
    top_beam_mask = jnp.arange(keep) < beams
    logits = jnp.repeat(first_logits, beams, axis=0)
    cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cache)
    penalty = settings.length_penalty
    stop_when_full = settings.early_stopping is True

    def cond(carry):
        return carry["go"]

    def body(carry):
        i = carry["i"]
        logp = jax.nn.log_softmax(carry["logits"].astype(jnp.float32), axis=-1)
        logp = _ban(logp, carry["previous"], settings).reshape(batch, beams, vocab)
        logp = (logp + carry["running_scores"][:, :, None]).reshape(batch, beams * vocab)
        # Top `keep` continuations over all beams (more than `beams`, so that
        # enough stay open when the best ones end).
        top_scores, top_index = jax.lax.top_k(logp, keep)
        origin = top_index // vocab
        token = (top_index % vocab).astype(jnp.int32)
        top_tokens = _gather_beams(carry["running_tokens"], origin)
        top_tokens = jax.lax.dynamic_update_slice_in_dim(top_tokens, token[:, :, None], i, axis=2)
        hits = _is_eos(token, settings.eos_ids) | (i + 1 >= steps)
        # Open beams for the next step: the best `beams` that did not stop.
        open_scores = top_scores + hits.astype(jnp.float32) * _NEG
        _, next_index = jax.lax.top_k(open_scores, beams)
        running_tokens = _gather_beams(top_tokens, next_index)
        running_scores = _gather_beams(open_scores, next_index)
        parent = _gather_beams(origin, next_index) + jnp.arange(batch)[:, None] * beams
        # Finished hypotheses: merge the newly stopped among the top `beams`.
        just_done = hits & top_beam_mask[None, :]
        done_scores = top_scores / ((i + 1).astype(jnp.float32) ** penalty)
        full = jnp.all(carry["is_done"], axis=-1, keepdims=True) & stop_when_full
        done_scores = done_scores + full.astype(jnp.float32) * _NEG
        done_scores = done_scores + (~carry["improvable"]).astype(jnp.float32) * _NEG
        done_scores = done_scores + (~just_done).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([carry["done_scores"], done_scores], axis=1)
        _, merged_index = jax.lax.top_k(merged_scores, beams)
        done_tokens = _gather_beams(jnp.concatenate([carry["done_tokens"], top_tokens], axis=1), merged_index)
        done_scores = _gather_beams(merged_scores, merged_index)
        is_done = _gather_beams(jnp.concatenate([carry["is_done"], just_done], axis=1), merged_index)
        # Can an open beam still beat the worst finished one?
        generated = i + 1
        if settings.early_stopping == "never" and penalty > 0.0:
            best_length = jnp.float32(steps)
        else:
            best_length = generated.astype(jnp.float32)
        best_open = running_scores[:, :1] / (best_length ** penalty)
        worst_done = jnp.where(is_done, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
        improvable = carry["improvable"] & jnp.any(best_open > worst_done, axis=-1, keepdims=True)
        go = (jnp.any(improvable) & ~(jnp.all(is_done) & stop_when_full) & ~jnp.all(hits))
        flat_parent = parent.reshape(-1)

        fed = jax.lax.dynamic_index_in_dim(running_tokens, i, axis=2, keepdims=False).reshape(-1)

        def advance():
            # Parents are beams of the same input, whose `fixed` rows are equal: only the cache moves.
            fixed, cache = carry["cache"]
            return step((fixed, jax.tree.map(lambda x: jnp.take(x, flat_parent, axis=0), cache)), fed, i)

        logits, cache = jax.lax.cond(go, advance, lambda: (carry["logits"], carry["cache"]))
        return dict(i=generated, go=go, logits=logits, cache=cache, previous=fed, running_tokens=running_tokens,
                    running_scores=running_scores, done_tokens=done_tokens, done_scores=done_scores,
                    is_done=is_done, improvable=improvable)

    running_scores = jnp.where(jnp.arange(beams)[None, :] == 0, 0.0, _NEG) * jnp.ones((batch, 1), jnp.float32)
    empty = jnp.full((batch, beams, steps), settings.pad_id, jnp.int32)
    init = dict(i=jnp.int32(0), go=jnp.bool_(True), logits=logits, cache=cache,
                previous=jnp.repeat(previous.astype(jnp.int32), beams, axis=0), running_tokens=empty,
                running_scores=running_scores, done_tokens=empty,
                done_scores=jnp.full((batch, beams), _NEG, jnp.float32), is_done=jnp.zeros((batch, beams), bool),
                improvable=jnp.ones((batch, 1), bool))
    out = jax.lax.while_loop(cond, body, init)
    tokens = _pad_after_eos(out["done_tokens"][:, 0], settings)
    return Generated(tokens, _lengths(tokens, settings), out["done_scores"][:, 0])


def _pad_after_eos(tokens: jax.Array, settings: SearchSettings) -> jax.Array:
    """A hypothesis copied from an open beam keeps nothing after its end; make that explicit."""
    ended = jnp.cumsum(_is_eos(tokens, settings.eos_ids), axis=-1) - _is_eos(tokens, settings.eos_ids)
    return jnp.where(ended > 0, settings.pad_id, tokens)


def search(first_logits: jax.Array, cache: Any, step: StepFn, settings: SearchSettings,
           previous: jax.Array) -> Generated:
    """Greedy decoding for one beam, beam search otherwise."""
    if settings.num_beams == 1:
        return greedy_search(first_logits, cache, step, settings, previous)
    return beam_search(first_logits, cache, step, settings, previous)


# ----------------------------------------------------------------------------- the models


def _generate_gemma(model: Gemma3, ids: jax.Array, mask: jax.Array, settings: SearchSettings) -> Generated:
    """Prefill right-padded prompts, then decode each row from its own prompt length."""
    lengths = mask.sum(-1).astype(jnp.int32)
    batch, prompt = ids.shape
    cache = model.init_cache(batch, prompt + settings.max_new_tokens - 1)
    hidden, cache = model.hidden_states_cached(ids, jnp.zeros((batch,), jnp.int32), cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def step(state, token, i):
        lengths, cache = state
        hidden, cache = model.hidden_states_cached(token[:, None], lengths + i, cache)
        return model.logits(hidden[:, 0]), (lengths, cache)

    previous = jnp.take_along_axis(ids, (lengths - 1)[:, None], axis=1)[:, 0].astype(jnp.int32)
    return search(model.logits(last), (lengths, cache), step, settings, previous)


def _generate_t5(model: MT5, ids: jax.Array, mask: jax.Array, settings: SearchSettings) -> Generated:
    """Encode once, start from the decoder start token at position 0, decode one position a step."""
    cfg = model.config
    encoded = model.encode(ids, mask)
    cache = model.init_decoder_cache(encoded, mask, settings.max_new_tokens)
    start = jnp.full((ids.shape[0],), cfg.decoder_start_token_id, jnp.int32)
    hidden, cache = model.decode_step(start, jnp.int32(0), cache)

    def split(cache: DecoderCache) -> tuple[Any, Any]:  # (fixed, cache): see StepFn
        return (cache.cross_kv, cache.cross_mask_bias), cache.self_kv

    def step(state, token, i):
        (cross_kv, cross_mask_bias), self_kv = state
        hidden, cache = model.decode_step(token, i + 1, DecoderCache(self_kv, cross_kv, cross_mask_bias))
        return model.logits(hidden), split(cache)

    return search(model.logits(hidden), split(cache), step, settings, start)


def generate(model: nnx.Module, ids: jax.Array, mask: jax.Array, settings: SearchSettings) -> Generated:
    """New tokens for a batch of right-padded prompts (`mask` marks real tokens); traceable under jit."""
    if isinstance(model, Gemma3):
        return _generate_gemma(model, ids, mask, settings)
    if isinstance(model, MT5):
        return _generate_t5(model, ids, mask, settings)
    raise TypeError(f"generation supports Gemma3 and MT5 models, not {type(model).__name__}")


def compile_generate(model: nnx.Module, settings: SearchSettings, mesh: Mesh,
                     rules=sharding.DEFAULT_RULES) -> Callable[[nnx.State, jax.Array, jax.Array], Generated]:
    """(weights, ids, mask) -> Generated as one ``jax.jit`` program, rows over `data`, weights as `rules` place them.

    The weights are an argument (``nnx.split(model)[1]``) rather than a
    closure or an ``nnx.jit`` module argument: ``nnx.jit`` walks the module
    graph and returns its state on every call, 0.23 s a call for
    Gemma-3-270M on a 2-core CPU, longer than a few decoding steps.
    """
    graphdef, state = nnx.split(model)

    def run(state, ids, mask):
        return generate(nnx.merge(graphdef, state), ids, mask, settings)

    def rows(ndim: int):
        return sharding.batch_sharding(mesh, ndim, rules)

    return jax.jit(run, in_shardings=(sharding.state_shardings(state, mesh, rules), rows(2), rows(2)),
                   out_shardings=Generated(rows(2), rows(1), rows(1)))


def settings_for(model: nnx.Module, max_new_tokens: int, **kwargs: Any) -> SearchSettings:
    """SearchSettings with the model's own end-of-sequence and pad ids."""
    cfg = model.config
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, Sequence) else (int(eos),)
    return SearchSettings(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=int(cfg.pad_token_id), **kwargs)
