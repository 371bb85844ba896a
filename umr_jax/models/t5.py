"""mT5 / T5 v1.1 encoder-decoder in Flax NNX: UMR's query-likelihood teacher.

One file for the model family, MaxText-style: the config, the layers and the
encoder-decoder with its LM head. Hugging Face names and conversions live in
:mod:`umr_jax.models.t5_weights`.

What makes T5 different from a textbook Transformer, and therefore from
:mod:`umr_jax.models.bert`:
  * pre-norm blocks with an RMS norm (x * w, no mean, no bias) and no biases
    anywhere;
  * no 1/sqrt(head_dim) attention scaling: T5 folds it into the query
    initialisation, so a checkpoint's logits are only right without it;
  * no position embeddings: a learned bias per (relative-distance bucket,
    head) is added to the attention logits. Only the first layer of each stack
    owns the table; every layer of the stack reuses that bias (bidirectional
    buckets in the encoder, causal ones in the decoder, none in
    cross-attention);
  * T5 v1.1 / mT5: a gated FFN (gelu_new(x W0) * (x W1)) W_o and an untied LM
    head. The original T5 ties the head to the input embedding and scales the
    decoder output by d_model**-0.5 first; ``tie_word_embeddings`` selects
    that variant.

Parameters keep explicit head dimensions ((embed, heads, kv) kernels) and carry
logical axis names that :mod:`umr_jax.sharding` maps onto the mesh: heads, mlp
and vocab split over ``model``, so mT5-XL (32 heads, d_ff 5120, 250k vocab)
shards over 8 devices for scoring. Matmuls run in the compute dtype and ask
for float32 results (:func:`umr_jax.models.layers.mixed_dot`, as Gemma), cast
back to the compute dtype: the same numbers in float32, float32 accumulation
in bfloat16.

Rows may pack several sequences (``segments`` / ``positions`` of
:meth:`MT5.encode` and :meth:`MT5.decode`, for the teacher's packed pairs):
attention stays within a sequence (cross-attention within a pair), and the
relative position bias is computed from positions restarting per sequence, so
each gets the states it gets alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umr_jax.models.layers import RMSNorm, mixed_dot, random_param, resolve_dtype, run_blocks, softmax_attention

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Defaults of transformers' T5Config where they differ from MT5Config (our
# dataclass defaults, mT5-small); used only for keys a config.json omits.
_T5_DEFAULTS: dict[str, Any] = dict(vocab_size=32128, d_ff=2048, num_layers=6, num_heads=8,
                                    feed_forward_proj="relu")
MODEL_TYPES = ("mt5", "t5")

# Additive attention bias for masked keys. Finite (not -inf) so that a row
# with every key masked gives a uniform softmax instead of NaN; float32 so it
# survives whatever the compute dtype is.
_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture hyperparameters, named as in Hugging Face's ``MT5Config``/``T5Config``.

    Defaults are mT5-small's. ``tie_word_embeddings=True`` is the original T5
    head: logits = (decoder output * d_model**-0.5) @ shared.T; False (T5 v1.1,
    mT5) is a separate ``lm_head`` and no scaling.
    """

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None  # None = num_layers, as in Hugging Face
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # Bidirectional buckets split in two halves, each with an exact half
        # and a logarithmic half up to max_distance: fewer than 4 buckets or a
        # max_distance inside the exact range divides by zero.
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if buckets < 4:
            raise ValueError(f"relative_attention_num_buckets must be >= 4, got {buckets}")
        if distance <= buckets // 2:
            raise ValueError(f"relative_attention_max_distance {distance} must exceed half of "
                             f"relative_attention_num_buckets ({buckets})")
        self._ffn_spec()  # validates feed_forward_proj

    def _ffn_spec(self) -> tuple[bool, str]:
        parts = self.feed_forward_proj.split("-")
        if len(parts) == 2 and parts[0] == "gated":
            gated, act = True, parts[1]
        elif len(parts) == 1:
            gated, act = False, parts[0]
        else:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not of the form "
                             "'ACT' or 'gated-ACT' (e.g. 'gated-gelu', 'relu')")
        # Hugging Face's backwards-compatibility rule: 'gated-gelu' (mT5, T5
        # v1.1) means the tanh approximation, plain 'gelu' the exact erf form.
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"
        if act not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: unsupported activation "
                             f"{act!r}; supported: {sorted(_ACTIVATIONS)}")
        return gated, act

    @property
    def is_gated_act(self) -> bool:
        return self._ffn_spec()[0]

    @property
    def dense_act_fn(self) -> str:
        return self._ffn_spec()[1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> T5Config:
        """Reads the fields we use from a Hugging Face ``config.json`` dict ('mt5' or 't5').

        The head variant cannot be read from ``tie_word_embeddings``:
        transformers 5 writes ``true`` there for every T5 and mT5 it saves.
          * 't5': the scaled, tied head iff ``scale_decoder_outputs`` (written
            by transformers 5) or else ``tie_word_embeddings`` (older files)
            is true, as in transformers' T5ForConditionalGeneration;
          * 'mt5': always the unscaled head, as transformers 5's
            MT5ForConditionalGeneration; every released mT5 has a separate
            ``lm_head`` (a checkpoint without one gets ``shared.weight`` there,
            see t5_weights.load_hf_weights).
        """
        model_type = cfg.get("model_type", "mt5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a T5 architecture (supported: "
                             f"{', '.join(MODEL_TYPES)})")
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = dict(_T5_DEFAULTS) if model_type == "t5" else {}
        values.update({k: cfg[k] for k in names if cfg.get(k) is not None})
        if isinstance(values.get("eos_token_id"), list | tuple):
            values["eos_token_id"] = values["eos_token_id"][0]
        if model_type == "t5":
            values["tie_word_embeddings"] = bool(cfg.get("scale_decoder_outputs",
                                                         cfg.get("tie_word_embeddings", True)))
        else:
            values["tie_word_embeddings"] = False
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers loads into the same model.

        The tied variant is written as model_type 't5': transformers 5's
        MT5ForConditionalGeneration never applies the d_model**-0.5 scaling.
        """
        out = dataclasses.asdict(self)
        if self.tie_word_embeddings:
            out.update(model_type="t5", architectures=["T5ForConditionalGeneration"],
                       scale_decoder_outputs=True)
        else:
            out.update(model_type="mt5", architectures=["MT5ForConditionalGeneration"])
        out.update(is_encoder_decoder=True, use_cache=True, initializer_factor=1.0)
        return out


def relative_position_buckets(relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bucket of each (memory - query) distance, as Mesh TensorFlow / Hugging Face compute it.

    Half of the buckets (per direction when bidirectional) hold exact small
    distances, the rest logarithmically wider ranges up to `max_distance`;
    anything further shares the last bucket. Causal buckets only count
    distances to the past (future positions land in bucket 0 and are masked).
    The arithmetic repeats the reference's float32 operations and truncation
    so that every boundary lands in the same bucket as in the checkpoints'
    training (tests compare against transformers over thousands of distances).
    Computed with numpy at trace time: it depends only on static lengths.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):  # log(0) at distance 0, which is_small selects away
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def shift_right(labels: Any, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Any:
    """Decoder inputs for teacher forcing: the start token, then labels[:, :-1].

    Positions labelled -100 (ignored by the loss) become `pad_token_id`, as in
    Hugging Face's ``_shift_right``. Defaults are mT5's (both ids 0). numpy in,
    numpy out (batch building on the host); anything else goes through jnp.
    """
    xp = np if isinstance(labels, np.ndarray) else jnp
    labels = xp.asarray(labels)
    start = xp.full((*labels.shape[:-1], 1), decoder_start_token_id, dtype=labels.dtype)
    shifted = xp.concatenate([start, labels[..., :-1]], axis=-1)
    return xp.where(shifted == -100, xp.asarray(pad_token_id, dtype=labels.dtype), shifted)


def _key_bias(mask: jax.Array) -> jax.Array:
    """(batch, keys) 1/0 mask -> additive float32 bias (batch, 1, 1, keys)."""
    return jnp.where(mask.astype(bool)[:, None, None, :], 0.0, _MASKED).astype(jnp.float32)


def segment_bias(query_segments: jax.Array, key_segments: jax.Array,
                 causal_positions: jax.Array | None = None) -> jax.Array:
    """Additive float32 bias (batch, 1, queries, keys) for rows packing several sequences.

    `*_segments[b, t]` numbers the sequence (1, 2, ...) that token t of row b
    belongs to, 0 = padding. A query sees the keys of its own sequence only;
    with `causal_positions` (self-attention: each token's position in its
    sequence) only those at or before its own position. For cross-attention
    the decoder's segment s attends to the encoder's segment s: a pair's
    target reads only that pair's prompt. Padding queries see nothing: the
    finite mask gives them a uniform softmax, and their outputs are never read.
    """
    visible = (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] > 0)
    if causal_positions is not None:
        visible = visible & (causal_positions[:, None, :] <= causal_positions[:, :, None])
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)[:, None]


class Attention(nnx.Module):
    """Multi-head attention without biases or logit scaling; optionally owns the relative bias table."""

    def __init__(self, cfg: T5Config, *, relative_bias: bool, bidirectional: bool, param_dtype: jnp.dtype,
                 dtype: jnp.dtype, rngs: nnx.Rngs, random_init: bool = True):
        self.dtype = dtype
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        e, n, d = cfg.d_model, cfg.num_heads, cfg.d_kv
        # Hugging Face's initialisation; the query's extra d_kv**-0.5 is where
        # T5 keeps the attention scaling that other Transformers apply to logits.
        qkv = ("embed", "heads", "kv")
        self.q_kernel = random_param(rngs, (e, n, d), qkv, param_dtype, random_init, (e * d) ** -0.5)
        self.k_kernel = random_param(rngs, (e, n, d), qkv, param_dtype, random_init, e ** -0.5)
        self.v_kernel = random_param(rngs, (e, n, d), qkv, param_dtype, random_init, e ** -0.5)
        self.o_kernel = random_param(rngs, (n, d, e), ("heads", "kv", "embed"), param_dtype, random_init,
                                     (n * d) ** -0.5)
        self.relative_bias = (
            random_param(rngs, (self.num_buckets, n), (None, "heads"), param_dtype, random_init, e ** -0.5)
            if relative_bias else None)
        self.attn_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def position_bias(self, query_length: int, key_length: int, positions: jax.Array | None = None) -> jax.Array:
        """Relative position bias, float32 (1, heads, query_length, key_length).

        With `positions` (batch, length), self-attention over packed rows: the
        distance of a (query, key) pair is key position - query position, the
        positions restarting at 0 in every sequence, so each sequence gets
        exactly the bias it gets alone; (batch, heads, length, length).
        Pairs across sequences get a distance too, but are masked.
        """
        if self.relative_bias is None:
            raise ValueError("this attention layer has no relative bias table (only each stack's first does)")
        # One bucket per distance (key - query) from -(q-1) to k-1, then a
        # (q, k) gather of the per-distance bias: the numpy constant stays
        # O(q + k) instead of O(q * k).
        distances = np.arange(-(query_length - 1), key_length)
        buckets = relative_position_buckets(distances, bidirectional=self.bidirectional,
                                            num_buckets=self.num_buckets, max_distance=self.max_distance)
        per_distance = jnp.take(self.relative_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        if positions is None:
            index = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None] + (query_length - 1)
            return jnp.take(per_distance, index, axis=0).transpose(2, 0, 1)[None]
        if query_length != key_length or positions.shape[1] != query_length:
            raise ValueError(f"positions {positions.shape} need a self-attention of one length, got "
                             f"{query_length} queries and {key_length} keys")
        # Positions lie in [0, length), so every distance is inside the table.
        index = positions[:, None, :] - positions[:, :, None] + (query_length - 1)
        return jnp.take(per_distance, index, axis=0).transpose(0, 3, 1, 2)

    def _project(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
        # A plain (tokens, heads * d_kv) product, then (batch, heads, length,
        # d_kv) for the attention matmuls, as in bert.SelfAttention._project.
        return mixed_dot("bte,ehd->bthd", x, kernel[...], self.dtype).transpose(0, 2, 1, 3)

    def __call__(self, x: jax.Array, context: jax.Array, position_bias: jax.Array | None, mask_bias: jax.Array,
                 *, deterministic: bool) -> jax.Array:
        """`x` attends to `context` (itself for self-attention); biases are float32 and broadcast."""
        q = self._project(x, self.q_kernel)
        return self.attend(q, *self.keys_values(context), position_bias, mask_bias, deterministic=deterministic)

    def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `context`, (batch, heads, length, d_kv)."""
        return self._project(context, self.k_kernel), self._project(context, self.v_kernel)

    def cached_keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What a decoding cache holds: keys (batch, heads, d_kv, length), slots last, and values
        (batch, heads, length, d_kv). With slots second to last, XLA's CPU backend copied every
        layer's keys into the query-key product's layout at each decoding step."""
        k, v = self.keys_values(context)
        return k.transpose(0, 1, 3, 2), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, position_bias: jax.Array | None,
               mask_bias: jax.Array, *, deterministic: bool, keys_transposed: bool = False) -> jax.Array:
        """Projected queries over keys/values -> the output projection (batch, queries, d_model).

        Keys are (batch, heads, length, d_kv), or (batch, heads, d_kv, length)
        if `keys_transposed` (the decoding cache's layout)."""
        keys = "bhdk" if keys_transposed else "bhkd"
        logits = jnp.einsum(f"bhqd,{keys}->bhqk", q, k, preferred_element_type=jnp.float32) + mask_bias
        if position_bias is not None:
            logits = logits + position_bias
        ctx = softmax_attention(logits, v, "bhqk,bhkd->bhqd", self.dtype,
                                lambda w: self.attn_dropout(w, deterministic=deterministic))
        return mixed_dot("bhqd,hde->bqe", ctx, self.o_kernel[...], self.dtype)

    def query(self, x: jax.Array) -> jax.Array:
        return self._project(x, self.q_kernel)


class FeedForward(nnx.Module):
    """act(x W_i) W_o, or act(x W_0) * (x W_1) W_o when gated (T5 v1.1 / mT5)."""

    def __init__(self, cfg: T5Config, *, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 random_init: bool = True):
        self.dtype = dtype
        self.gated = cfg.is_gated_act
        self.activation = _ACTIVATIONS[cfg.dense_act_fn]
        e, m = cfg.d_model, cfg.d_ff
        if self.gated:
            self.wi_0 = random_param(rngs, (e, m), ("embed", "mlp"), param_dtype, random_init, e ** -0.5)
            self.wi_1 = random_param(rngs, (e, m), ("embed", "mlp"), param_dtype, random_init, e ** -0.5)
        else:
            self.wi = random_param(rngs, (e, m), ("embed", "mlp"), param_dtype, random_init, e ** -0.5)
        self.wo = random_param(rngs, (m, e), ("mlp", "embed"), param_dtype, random_init, m ** -0.5)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        dt = self.dtype
        if self.gated:
            hidden = (self.activation(mixed_dot("...e,em->...m", x, self.wi_0[...], dt))
                      * mixed_dot("...e,em->...m", x, self.wi_1[...], dt))
        else:
            hidden = self.activation(mixed_dot("...e,em->...m", x, self.wi[...], dt))
        hidden = self.dropout(hidden, deterministic=deterministic)
        return mixed_dot("...m,me->...e", hidden, self.wo[...], dt)


class _Block(nnx.Module):
    """What the encoder's and decoder's pre-norm blocks share: dropout on each residual, the FFN sub-layer last."""

    def _residual(self, x: jax.Array, update: jax.Array, deterministic: bool) -> jax.Array:
        return x + self.dropout(update, deterministic=deterministic)

    def _feed_forward(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return self._residual(x, self.ffn(self.ffn_norm(x), deterministic=deterministic), deterministic)


class EncoderLayer(_Block):
    """Pre-norm block: x + Attn(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, cfg: T5Config, *, first: bool, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 random_init: bool = True):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, random_init=random_init)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.attention = Attention(cfg, relative_bias=first, bidirectional=True, **kw)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.ffn = FeedForward(cfg, **kw)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        h = self.attention_norm(x)
        x = self._residual(x, self.attention(h, h, position_bias, mask_bias, deterministic=deterministic),
                           deterministic)
        return self._feed_forward(x, deterministic)


class DecoderLayer(_Block):
    """Pre-norm block: causal self-attention, cross-attention to the encoder, FFN."""

    def __init__(self, cfg: T5Config, *, first: bool, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 random_init: bool = True):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, random_init=random_init)
        self.self_attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.self_attention = Attention(cfg, relative_bias=first, bidirectional=False, **kw)
        self.cross_attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.cross_attention = Attention(cfg, relative_bias=False, bidirectional=True, **kw)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.ffn = FeedForward(cfg, **kw)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, encoded: jax.Array, position_bias: jax.Array, self_mask_bias: jax.Array,
                 cross_mask_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        h = self.self_attention_norm(x)
        x = self._residual(x, self.self_attention(h, h, position_bias, self_mask_bias, deterministic=deterministic),
                           deterministic)
        # Cross-attention has no position bias (Hugging Face adds zeros).
        h = self.cross_attention_norm(x)
        x = self._residual(x, self.cross_attention(h, encoded, None, cross_mask_bias, deterministic=deterministic),
                           deterministic)
        return self._feed_forward(x, deterministic)

    def step(self, x: jax.Array, t: jax.Array, position_bias: jax.Array, self_mask_bias: jax.Array,
             cross_kv: tuple[jax.Array, jax.Array], cross_mask_bias: jax.Array,
             cache: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One decoding position `t` (x: (batch, 1, d_model)) over the self-attention cache and the
        precomputed cross-attention keys/values; the token's keys/values are written at slot t first."""
        h = self.self_attention_norm(x)
        k, v = self.self_attention.cached_keys_values(h)
        cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), t, axis=3),
                 jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), t, axis=2))
        x = x + self.self_attention.attend(self.self_attention.query(h), *cache, position_bias, self_mask_bias,
                                           deterministic=True, keys_transposed=True)
        h = self.cross_attention_norm(x)
        x = x + self.cross_attention.attend(self.cross_attention.query(h), *cross_kv, None, cross_mask_bias,
                                            deterministic=True, keys_transposed=True)
        return x + self.ffn(self.ffn_norm(x), deterministic=True), cache


class _Stack(nnx.Module):
    """Blocks of one kind (the first owns the stack's relative bias table), then a final norm; dropout around."""

    def __init__(self, cfg: T5Config, block: type[_Block], num_blocks: int, *, param_dtype: jnp.dtype,
                 dtype: jnp.dtype, rngs: nnx.Rngs, random_init: bool = True):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, random_init=random_init)
        self.layers = nnx.List([block(cfg, first=i == 0, **kw) for i in range(num_blocks)])
        self.scan_layers = False  # layers.run_blocks: one compiled block for inference (layers.set_scan_layers)
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def _run(self, x: jax.Array, *args: jax.Array, deterministic: bool) -> jax.Array:
        """Dropout, every block with `args`, the final norm, dropout."""
        x = self.dropout(x, deterministic=deterministic)
        x = run_blocks(self.layers, x, *args, scan=self.scan_layers, deterministic=deterministic)
        return self.dropout(self.final_norm(x), deterministic=deterministic)


class Encoder(_Stack):
    """Embedded source tokens -> encoder states; bidirectional position bias shared by all layers."""

    def __init__(self, cfg: T5Config, **kw: Any):
        super().__init__(cfg, EncoderLayer, cfg.num_layers, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool,
                 segments: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """One right-padded sequence per row (`mask`), or packed rows (`segments` and `positions`)."""
        length = x.shape[1]
        if segments is None:
            position_bias = self.layers[0].attention.position_bias(length, length)
            return self._run(x, position_bias, _key_bias(mask), deterministic=deterministic)
        position_bias = self.layers[0].attention.position_bias(length, length, positions)
        return self._run(x, position_bias, segment_bias(segments, segments), deterministic=deterministic)


class Decoder(_Stack):
    """Embedded target tokens + encoder states -> decoder states; causal, teacher-forced (no cache)."""

    def __init__(self, cfg: T5Config, **kw: Any):
        super().__init__(cfg, DecoderLayer, cfg.num_decoder_layers, **kw)

    def __call__(self, x: jax.Array, encoded: jax.Array, encoder_mask: jax.Array | None,
                 decoder_mask: jax.Array | None, *, deterministic: bool, encoder_segments: jax.Array | None = None,
                 segments: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Right-padded rows (`encoder_mask`, `decoder_mask`), or packed rows: decoder `segments` and
        `positions`, and the `encoder_segments` of the same pairs (decoder segment s reads encoder segment s)."""
        length = x.shape[1]
        if segments is None:
            position_bias = self.layers[0].self_attention.position_bias(length, length)
            causal = jnp.tril(jnp.ones((length, length), bool))
            visible = causal[None, None] & decoder_mask.astype(bool)[:, None, None, :]
            self_mask_bias = jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)  # (batch, 1, T, T)
            cross_mask_bias = _key_bias(encoder_mask)
        else:
            if encoder_segments is None:
                raise ValueError("packed decoder rows need the encoder_segments of the same pairs")
            position_bias = self.layers[0].self_attention.position_bias(length, length, positions)
            self_mask_bias = segment_bias(segments, segments, causal_positions=positions)
            cross_mask_bias = segment_bias(segments, encoder_segments)
        return self._run(x, encoded, position_bias, self_mask_bias, cross_mask_bias, deterministic=deterministic)


    def step(self, x: jax.Array, t: jax.Array, state: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Final decoder states (batch, 1, d_model) of the token at position `t`, and the updated cache.

        Equals row t of :meth:`__call__` over the whole target: the same
        relative position bias row, and keys after t are masked.
        """
        length = state.self_kv[0][1].shape[2]
        # Row t of the (length x length) causal bias: a gather from the small
        # table, cheaper than carrying a per-row copy through beam reordering.
        full_bias = self.layers[0].self_attention.position_bias(length, length)
        position_bias = jax.lax.dynamic_slice_in_dim(full_bias, t, 1, axis=2)
        self_mask_bias = jnp.where(jnp.arange(length) <= t, 0.0, _MASKED).astype(jnp.float32)[None, None, None]
        updated = []
        for layer, cross_kv, cache in zip(self.layers, state.cross_kv, state.self_kv, strict=True):
            x, cache = layer.step(x, t, position_bias, self_mask_bias, cross_kv, state.cross_mask_bias, cache)
            updated.append(cache)
        return self.final_norm(x), dataclasses.replace(state, self_kv=updated)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecoderCache:
    """What incremental decoding keeps per row: self-attention keys/values, cross-attention keys/values.

    `self_kv` (per layer, keys (batch, heads, d_kv, target_slots) and values
    (batch, heads, target_slots, d_kv); cross keys are slots last too) grows one
    slot a step; the rest is computed once from the encoder output. Every
    leaf has one row per sequence; beam search reorders only `self_kv` (an
    input's beams share the rest, see ``generate.StepFn``).
    """

    self_kv: list[tuple[jax.Array, jax.Array]]
    cross_kv: list[tuple[jax.Array, jax.Array]]
    cross_mask_bias: jax.Array  # (batch, 1, 1, source_length)


class MT5(nnx.Module):
    """mT5 / T5 encoder-decoder with its LM head; scoring splits into encode, decode and logits.

    The split lets a scorer run the LM head only at the positions it needs (or
    in vocabulary chunks) instead of materialising (tokens x 250k) logits.
    """

    def __init__(self, cfg: T5Config, *, param_dtype: str | jnp.dtype = "float32",
                 dtype: str | jnp.dtype = "float32", rngs: nnx.Rngs, random_init: bool = True):
        self.config = cfg
        self.dtype = resolve_dtype(dtype)
        param_dtype = resolve_dtype(param_dtype)
        kw = dict(param_dtype=param_dtype, dtype=self.dtype, rngs=rngs, random_init=random_init)
        # One input embedding for encoder and decoder (HF: shared.weight, aliased
        # as encoder/decoder.embed_tokens.weight).
        self.shared = random_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype,
                                   random_init, 1.0)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        random_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), param_dtype,
                                     random_init, 1.0))
        # The teacher's chunked log-softmax asks every LM for its soft-cap; T5 has none.
        self.logit_softcap = 0.0

    def _embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.shared[...], ids, axis=0).astype(self.dtype)

    def encode(self, ids: jax.Array, mask: jax.Array | None, *, deterministic: bool = True,
               segments: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Encoder states (batch, source_length, d_model) in the compute dtype.

        Rows hold one right-padded sequence each (`mask`), or, with `segments`
        (1, 2, ... per sequence, 0 = padding; `mask` is then unused) and
        `positions` (restarting at 0 per sequence), several contiguous
        sequences: each attends only to itself, with its own relative
        positions, and gets exactly the states it gets alone.
        """
        return self.encoder(self._embed(ids), mask, deterministic=deterministic, segments=segments,
                            positions=positions)

    def decode(self, encoded: jax.Array, encoder_mask: jax.Array | None, decoder_ids: jax.Array,
               decoder_mask: jax.Array | None, *, deterministic: bool = True,
               encoder_segments: jax.Array | None = None, segments: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
        """Final decoder states (batch, target_length, d_model): exactly what the LM head consumes.

        Packed rows as in :meth:`encode`: decoder `segments` / `positions`
        (each segment starts with the decoder start token, its target shifted
        right) and the `encoder_segments` of `encoded`; decoder segment s is
        the target of encoder segment s, causal within itself, and reads only
        that prompt. The masks are then unused.

        Includes the d_model**-0.5 scaling of the tied-head variant, so that
        ``logits(decode(...))`` is the model's output whichever head it has.
        """
        hidden = self.decoder(self._embed(decoder_ids), encoded, encoder_mask, decoder_mask,
                              deterministic=deterministic, encoder_segments=encoder_segments, segments=segments,
                              positions=positions)
        if self.config.tie_word_embeddings:
            hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, hidden.dtype)
        return hidden

    def init_decoder_cache(self, encoded: jax.Array, encoder_mask: jax.Array, length: int) -> DecoderCache:
        """The decoding state for `length` target positions: cross keys/values from `encoded`, empty self cache."""
        cfg = self.config
        layers = self.decoder.layers
        keys = (encoded.shape[0], cfg.num_heads, cfg.d_kv, length)
        values = (encoded.shape[0], cfg.num_heads, length, cfg.d_kv)
        return DecoderCache(
            self_kv=[(jnp.zeros(keys, self.dtype), jnp.zeros(values, self.dtype)) for _ in layers],
            cross_kv=[layer.cross_attention.cached_keys_values(encoded) for layer in layers],
            cross_mask_bias=_key_bias(encoder_mask))

    def decode_step(self, token: jax.Array, t: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Decoder states (batch, d_model) for one new token per row at position `t`, ready for :meth:`logits`."""
        hidden, cache = self.decoder.step(self._embed(token[:, None]), t, cache)
        if self.config.tie_word_embeddings:
            hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, hidden.dtype)
        return hidden[:, 0], cache

    def head_weight(self) -> jax.Array:
        """The LM head as (vocab, d_model) in the compute dtype (rows gathered per label by scorers)."""
        if self.lm_head is None:
            return self.shared[...].astype(self.dtype)
        return self.lm_head[...].astype(self.dtype).T

    def head_kernel(self) -> jax.Array | None:
        """The untied LM head as stored, (d_model, vocab) in the compute dtype; None for the tied head.

        Scorers slice its columns in place: :meth:`head_weight` is its
        transpose, which XLA copies whole (512 MB for mT5-small in float32).
        """
        return None if self.lm_head is None else self.lm_head[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head only: (..., d_model) -> float32 (..., vocab), accumulated in float32."""
        hidden = hidden.astype(self.dtype)
        if self.lm_head is None:
            return jnp.einsum("...e,ve->...v", hidden, self.shared[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...e,ev->...v", hidden, self.lm_head[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, ids: jax.Array, mask: jax.Array, decoder_ids: jax.Array, decoder_mask: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits, float32 (batch, target_length, vocab)."""
        encoded = self.encode(ids, mask, deterministic=deterministic)
        return self.logits(self.decode(encoded, mask, decoder_ids, decoder_mask, deterministic=deterministic))

    def shift_right(self, labels: Any) -> Any:
        """:func:`shift_right` with this model's decoder start and pad ids."""
        return shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
