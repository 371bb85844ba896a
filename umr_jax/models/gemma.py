"""Gemma 3 decoder-only language model (the teacher that scores queries) in Flax NNX.

One file for the whole model, MaxText-style: the config and the layers. The
forward pass follows Hugging Face's ``Gemma3ForCausalLM`` (the PyTorch
reference of the parity tests) operation for operation:

  embeddings * sqrt(hidden)   (the normalizer rounded to the compute dtype, as HF does)
  per layer:  x += post_attn_norm(attention(input_norm(x)))
              x += post_ffn_norm(ffn(pre_ffn_norm(x)))
  final norm -> tied LM head -> optional tanh soft-cap of the logits

Attention is grouped-query attention with RMS norms on queries and keys over
head_dim, half-split ("rotate_half") rotary embeddings, a scale of
query_pre_attn_scalar**-0.5, and two layer types: 'sliding_attention' (causal
within the last `sliding_window` positions, RoPE base rope_local_base_freq)
and 'full_attention' (causal, RoPE base rope_theta, optionally linearly
scaled). RMS norms compute x * (1 + w) in float32.

Projections keep explicit head dimensions ((embed, heads, head_dim) kernels,
(embed, kv_heads, head_dim) for keys/values) so that tensor parallelism splits
heads, and every parameter carries logical axis names for
:mod:`umr_jax.sharding`.

Batches are right-padded: row r holds tokens at positions 0..len_r-1 and
`mask` marks them; padded keys are masked out, padded query positions produce
values that callers ignore.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from umr_jax.models.layers import RMSNorm, mixed_dot, random_param, resolve_dtype, softmax_attention

LAYER_TYPES = ("sliding_attention", "full_attention")
MODEL_TYPES = ("gemma3_text", "gemma3")

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# What transformers' Gemma3TextConfig assumes when a config.json predates
# `layer_types`: every sixth layer is global.
_DEFAULT_SLIDING_WINDOW_PATTERN = 6
_MASKED = -1e9  # additive bias for hidden keys, float32 so it survives bf16 compute
# One layer's keys (batch, kv_heads, head_dim, slots) and values (batch, kv_heads, slots, head_dim).
KVCache = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Architecture hyperparameters, named (and defaulted) as in Hugging Face's ``Gemma3TextConfig``.

    `rope_scaling_factor` is the linear RoPE scaling that larger Gemma 3
    checkpoints (4B and up: ``rope_scaling = {"rope_type": "linear", "factor":
    8.0}``) apply to the global layers only; 1.0 means none. Other scaling
    types are rejected by :meth:`from_hf_dict` rather than silently ignored.
    `layer_types` left empty is filled from the HF default pattern (every
    sixth layer global). `attn_logit_softcapping` is kept for round trips
    only: Gemma 3 replaced Gemma 2's attention soft-cap by QK norms, and
    neither transformers' Gemma3Attention nor llama.cpp applies it, so
    neither do we (every released Gemma 3 config has it null).
    """

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: int | float = 256
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unsupported layer_types {unknown}; supported: {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_activation {self.hidden_activation!r}; "
                             f"supported: {sorted(_ACTIVATIONS)}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling_factor <= 0:
            raise ValueError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> Gemma3Config:
        """Reads a Hugging Face ``config.json`` dict: ``gemma3_text``, or ``gemma3`` with a text_config.

        Both RoPE formats are accepted: transformers 5's ``rope_parameters``
        (per layer type) and the older ``rope_theta`` / ``rope_local_base_freq``
        / ``rope_scaling`` keys. Only the 'default' and 'linear' RoPE types
        exist in Gemma 3 checkpoints; anything else raises.
        """
        if cfg.get("model_type") == "gemma3" or "text_config" in cfg:
            text = cfg.get("text_config")
            if not isinstance(text, Mapping):
                raise ValueError("a 'gemma3' (multimodal) config needs a 'text_config' object")
            merged = dict(text)
            # The multimodal wrapper carries the tying flag at top level.
            merged.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
            cfg = merged
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (an encoder such as EmbeddingGemma) is not a "
                             "causal language model; this model supports causal Gemma 3 only")
        if cfg.get("attention_bias"):
            raise ValueError("attention_bias=True is not part of Gemma 3 and is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            kwargs[key] = cfg.get(key)
        if kwargs["attn_logit_softcapping"]:
            logging.warning("attn_logit_softcapping=%s is ignored: Gemma 3 does not apply it (neither does "
                            "transformers)", kwargs["attn_logit_softcapping"])
        kwargs.update(_rope_from_hf(cfg))
        if "layer_types" not in cfg or cfg["layer_types"] is None:
            pattern = int(cfg.get("sliding_window_pattern", _DEFAULT_SLIDING_WINDOW_PATTERN))
            kwargs["layer_types"] = default_layer_types(int(cfg.get("num_hidden_layers", 26)), pattern)
        # Missing keys take HF's defaults (ours are the same), as in multimodal
        # text_configs that list only what differs from Gemma3TextConfig.
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.Gemma3TextConfig`` / ``Gemma3ForCausalLM`` load."""
        out = dataclasses.asdict(self)
        out.pop("rope_scaling_factor")
        out.pop("rope_theta")
        out.pop("rope_local_base_freq")
        out["layer_types"] = list(self.layer_types)
        if float(self.query_pre_attn_scalar).is_integer():  # transformers' strict config wants an int
            out["query_pre_attn_scalar"] = int(self.query_pre_attn_scalar)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full = {"rope_type": "linear", "factor": self.rope_scaling_factor, "rope_theta": self.rope_theta}
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
        }
        out.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], attention_bias=False,
                   attention_dropout=0.0, use_bidirectional_attention=False, initializer_range=0.02,
                   use_cache=True)
        return out


def default_layer_types(num_layers: int, pattern: int = _DEFAULT_SLIDING_WINDOW_PATTERN) -> tuple[str, ...]:
    """Every `pattern`-th layer global (layers 5, 11, 17 of 18 for the default 6), the rest sliding."""
    if pattern < 1:
        raise ValueError(f"sliding window pattern must be positive, got {pattern}")
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


def _rope_from_hf(cfg: Mapping[str, Any]) -> dict[str, float]:
    """RoPE bases and the global layers' linear factor from either HF config format."""
    params = cfg.get("rope_parameters")
    full: dict[str, Any] = {}
    local: dict[str, Any] = {}
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    elif isinstance(params, Mapping):  # one dict for every layer: applies to the global layers
        full = dict(params)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, Mapping):  # old format: rope_scaling applies to the global layers only
        full.update(scaling)
    out: dict[str, float] = {
        "rope_theta": float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
        "rope_local_base_freq": float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))),
    }
    for which, spec in (("global", full), ("sliding", local)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind == "default":
            continue
        if kind == "linear" and which == "global":
            out["rope_scaling_factor"] = float(spec["factor"])
            continue
        raise ValueError(f"unsupported RoPE type {kind!r} for the {which} layers; Gemma 3 uses 'default' "
                         "(and 'linear' on global layers)")
    return out


def rope_inverse_frequencies(head_dim: int, base: float, factor: float = 1.0) -> np.ndarray:
    """1 / (base ** (2i / head_dim)) / factor, float32 (HF's default and 'linear' RoPE)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / (base ** exponent) / factor).astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def attention_bias(mask: jax.Array, sliding_window: int | None) -> jax.Array:
    """Additive float32 bias (batch, 1, 1, query, key): causal, key padding, optional window.

    A query at position q sees keys k with k <= q and, for sliding layers,
    q - k < sliding_window: itself and the `sliding_window - 1` positions
    before it, exactly HF's ``kv_idx > q_idx - sliding_window``.
    """
    length = mask.shape[1]
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    visible = k <= q
    if sliding_window is not None:
        visible = visible & (q - k < sliding_window)
    visible = visible[None] & (mask[:, None, :] > 0)
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


def packed_attention_bias(segments: jax.Array, positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """Like :func:`attention_bias` for rows holding several sequences.

    `segments[b, t]` numbers the sequence token t belongs to (0 = padding) and
    `positions` restart at 0 for each; a token sees the earlier tokens of its
    own sequence only (within the window on sliding layers), so every
    sequence is computed exactly as if it had a row of its own.
    """
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    delta = positions[:, :, None] - positions[:, None, :]  # query position - key position
    visible = same & (delta >= 0)
    if sliding_window is not None:
        visible = visible & (delta < sliding_window)
    # Padding queries see themselves, so no softmax row is empty.
    visible = visible | jnp.eye(segments.shape[1], dtype=bool)[None]
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


def cached_attention_bias(positions: jax.Array, length: int, sliding_window: int | None) -> jax.Array:
    """Additive float32 bias (batch, 1, 1, T, length) for queries at `positions` (batch, T) over cache slots.

    Slot j holds position j, so a query at position q sees slots j <= q
    (and q - j < sliding_window on sliding layers), as :func:`attention_bias`.
    """
    delta = positions[:, :, None] - jnp.arange(length)[None, None, :]
    visible = delta >= 0
    if sliding_window is not None:
        visible = visible & (delta < sliding_window)
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


def write_rows(cache: jax.Array, update: jax.Array, start: jax.Array, axis: int = 2) -> jax.Array:
    """cache[r, ..., start[r]:start[r]+T (on `axis`), ...] = update[r] for every row r."""
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), s, axis=axis - 1))(
        cache, update, start)


class Attention(nnx.Module):
    """Grouped-query self-attention with QK norms and rotary embeddings."""

    def __init__(self, cfg: Gemma3Config, *, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 random_init: bool = True):
        self.dtype = dtype
        self.num_kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_query_groups
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_kernel = random_param(rngs, (h, n, d), ("embed", "heads", "kv"), param_dtype, random_init)
        self.k_kernel = random_param(rngs, (h, kv, d), ("embed", "kv_heads", "kv"), param_dtype, random_init)
        self.v_kernel = random_param(rngs, (h, kv, d), ("embed", "kv_heads", "kv"), param_dtype, random_init)
        self.o_kernel = random_param(rngs, (n, d, h), ("heads", "kv", "embed"), param_dtype, random_init)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype, offset=1.0, axes=("kv",))
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype, offset=1.0, axes=("kv",))

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Normed, rotated queries and keys, and values, as (batch, heads, length, head_dim)."""
        dt = self.dtype
        # Plain (tokens, heads * head_dim) products, then (batch, heads, length,
        # head_dim) for the attention einsums to batch over leading dimensions
        # (see bert.SelfAttention._project).
        q, k, v = (mixed_dot("bte,ehd->bthd", x, kernel[...], dt).transpose(0, 2, 1, 3)
                   for kernel in (self.q_kernel, self.k_kernel, self.v_kernel))
        q = self.q_norm(q)
        k = self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
                keys_transposed: bool = False) -> jax.Array:
        """Attention of (batch, heads, q, head_dim) queries over keys (batch, kv_heads, slots, head_dim),
        or (batch, kv_heads, head_dim, slots) if `keys_transposed` (the cache's layout)."""
        dt = self.dtype
        b, n, t, d = q.shape
        # Query head j uses key/value head j // groups (HF's repeat_kv order).
        q = q.reshape(b, self.num_kv_heads, self.groups, t, d)
        keys = "bkds" if keys_transposed else "bksd"
        logits = jnp.einsum(f"bkgqd,{keys}->bkgqs", q, k, preferred_element_type=jnp.float32) * self.scale
        ctx = softmax_attention(logits + bias, v, "bkgqs,bksd->bkgqd", dt).reshape(b, n, t, d)
        return mixed_dot("bhqd,hde->bqe", ctx, self.o_kernel[...], dt)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        return self._attend(*self._qkv(x, cos, sin), bias)

    def cached(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array, cache: KVCache,
               start: jax.Array) -> tuple[jax.Array, KVCache]:
        """Attention of new tokens over a key/value cache that they are first written into.

        Row r's new keys and values land at cache slots start[r], start[r]+1, ...
        (the tokens' positions), and `bias` (see :func:`cached_attention_bias`)
        hides every slot after a query's own position, so slots that still
        hold stale values (a right-padded prompt's padding) are never read.
        Keys are cached transposed, slots last (see :meth:`Gemma3.init_cache`).
        """
        q, k, v = self._qkv(x, cos, sin)
        cache = (write_rows(cache[0], k.transpose(0, 1, 3, 2), start, axis=3), write_rows(cache[1], v, start))
        return self._attend(q, *cache, bias, keys_transposed=True), cache


class FeedForward(nnx.Module):
    """Gated FFN: down(act(gate(x)) * up(x)), act = tanh-approximate GELU."""

    def __init__(self, cfg: Gemma3Config, *, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 random_init: bool = True):
        self.dtype = dtype
        self.activation = _ACTIVATIONS[cfg.hidden_activation]
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate = random_param(rngs, (h, m), ("embed", "mlp"), param_dtype, random_init)
        self.up = random_param(rngs, (h, m), ("embed", "mlp"), param_dtype, random_init)
        self.down = random_param(rngs, (m, h), ("mlp", "embed"), param_dtype, random_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = self.activation(mixed_dot("bte,em->btm", x, self.gate[...], dt))
        hidden = gate * mixed_dot("bte,em->btm", x, self.up[...], dt)
        return mixed_dot("btm,me->bte", hidden, self.down[...], dt)


class DecoderLayer(nnx.Module):
    """Pre- and post-norms around both sub-layers (Gemma 2/3 "sandwich" norms)."""

    def __init__(self, cfg: Gemma3Config, layer_type: str, *, param_dtype: jnp.dtype, dtype: jnp.dtype,
                 rngs: nnx.Rngs, random_init: bool = True):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, random_init=random_init)
        self.layer_type = layer_type
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm = RMSNorm(h, eps, param_dtype, offset=1.0)
        self.attention = Attention(cfg, **kw)
        self.post_attention_norm = RMSNorm(h, eps, param_dtype, offset=1.0)
        self.pre_ffn_norm = RMSNorm(h, eps, param_dtype, offset=1.0)
        self.ffn = FeedForward(cfg, **kw)
        self.post_ffn_norm = RMSNorm(h, eps, param_dtype, offset=1.0)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.post_attention_norm(self.attention(self.input_norm(x), cos, sin, bias))
        return x + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(x)))

    def cached(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array, cache: KVCache,
               start: jax.Array) -> tuple[jax.Array, KVCache]:
        """:meth:`__call__` for new tokens over this layer's key/value cache (see :meth:`Attention.cached`)."""
        update, cache = self.attention.cached(self.input_norm(x), cos, sin, bias, cache, start)
        x = x + self.post_attention_norm(update)
        return x + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(x))), cache


class Gemma3(nnx.Module):
    """Token ids -> final hidden states -> float32 next-token logits.

    `hidden_states` and `logits` are separate so that a scorer can apply the
    262k-row LM head only at the positions it needs (the head costs more than
    the rest of the 270M model per token).
    """

    def __init__(self, cfg: Gemma3Config, *, param_dtype: str | jnp.dtype = "float32",
                 dtype: str | jnp.dtype = "float32", rngs: nnx.Rngs, random_init: bool = True):
        self.config = cfg
        self.dtype = resolve_dtype(dtype)
        param_dtype = resolve_dtype(param_dtype)
        kw = dict(param_dtype=param_dtype, dtype=self.dtype, rngs=rngs, random_init=random_init)
        self.embed = random_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype,
                                  random_init)
        self.layers = nnx.List([DecoderLayer(cfg, t, **kw) for t in cfg.layer_types])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, offset=1.0)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        random_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype,
                                     random_init))
        # Scorers that chunk the vocabulary ask every LM for its soft-cap (0 = none).
        self.logit_softcap = float(cfg.final_logit_softcapping or 0.0)

    def _rope_tables(self, length: int, positions: jax.Array | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
        """cos/sin per layer type, in the compute dtype as in HF.

        (length, head_dim) for positions 0..length-1, or (batch, 1, length,
        head_dim) for explicit per-token `positions` (packed rows).
        """
        cfg = self.config
        if positions is None:
            positions = np.arange(length, dtype=np.float32)[:, None]
        else:
            positions = positions.astype(jnp.float32)[:, None, :, None]
        tables = {}
        for layer_type in set(cfg.layer_types):
            if layer_type == "full_attention":
                inv = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
            else:
                inv = rope_inverse_frequencies(cfg.head_dim, cfg.rope_local_base_freq)
            freqs = jnp.asarray(positions) * jnp.asarray(inv)
            angles = jnp.concatenate([freqs, freqs], axis=-1)
            tables[layer_type] = (jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype))
        return tables

    def hidden_states(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                      segments: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Final-norm states (batch, length, hidden) in the compute dtype: what the LM head consumes.

        Rows hold one right-padded sequence each (`mask`), or, with `segments`
        and `positions` (see :func:`packed_attention_bias`), several sequences
        packed back to back, each computed as if alone. `deterministic` is
        accepted for interface parity with the other models; Gemma 3 has no
        dropout, so it changes nothing.
        """
        del deterministic
        cfg = self.config
        # HF multiplies by sqrt(hidden) cast to the weights' dtype: 25.25 rather
        # than 25.30 for hidden 640 in bfloat16. Matching it keeps bf16 runs
        # comparable to the reference.
        normalizer = jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        x = jnp.take(self.embed[...], ids, axis=0).astype(self.dtype) * normalizer
        rope = self._rope_tables(ids.shape[1], positions if segments is not None else None)
        biases = {}
        for t in set(cfg.layer_types):
            window = cfg.sliding_window if t == "sliding_attention" else None
            biases[t] = (attention_bias(mask, window) if segments is None
                         else packed_attention_bias(segments, positions, window))
        return self._layers(x, rope, biases)

    def init_cache(self, batch: int, length: int) -> list[KVCache]:
        """Zeroed keys (batch, kv_heads, head_dim, length) and values (batch, kv_heads, length, head_dim) per layer.

        Keys are stored slots last, the layout the query-key product reads as
        it is: with slots second to last, XLA's CPU backend copied every
        layer's whole key cache into that layout at each decoding step (a
        sixth of a Gemma-3-270M step). Every layer keeps all positions,
        sliding ones included: the window is applied by the attention bias,
        which keeps one code path and one cache shape (a 270M model's cache is
        small next to its weights).
        """
        cfg = self.config
        keys = (batch, cfg.num_key_value_heads, cfg.head_dim, length)
        values = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        return [(jnp.zeros(keys, self.dtype), jnp.zeros(values, self.dtype)) for _ in self.layers]

    def hidden_states_cached(self, ids: jax.Array, start: jax.Array,
                             cache: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        """Final-norm states of new tokens `ids` (batch, T) at positions start[r] + 0..T-1, and the updated cache.

        Prefill is a call with start = 0 and the right-padded prompts; each
        decoding step is a call with one token per row at its own position.
        A row's states equal :meth:`hidden_states` over its whole sequence.
        """
        cfg = self.config
        positions = start[:, None] + jnp.arange(ids.shape[1])[None, :]
        normalizer = jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        x = jnp.take(self.embed[...], ids, axis=0).astype(self.dtype) * normalizer
        rope = self._rope_tables(ids.shape[1], positions)
        length = cache[0][1].shape[2]
        biases = {t: cached_attention_bias(positions, length, cfg.sliding_window if t == "sliding_attention" else None)
                  for t in set(cfg.layer_types)}
        updated = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            cos, sin = rope[layer.layer_type]
            x, layer_cache = layer.cached(x, cos, sin, biases[layer.layer_type], layer_cache, start)
            updated.append(layer_cache)
        return self.final_norm(x), updated

    def _layers(self, x: jax.Array, rope: dict, biases: dict) -> jax.Array:
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            x = layer(x, cos, sin, biases[layer.layer_type])
        return self.final_norm(x)

    def head_weight(self) -> jax.Array:
        """The LM head as (vocab, hidden) in the compute dtype (rows gathered per label by scorers)."""
        table = self.embed if self.lm_head is None else self.lm_head
        return table[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head only: (..., hidden) -> float32 (..., vocab), accumulated in float32, soft-capped if set."""
        z = jnp.einsum("...e,ve->...v", hidden.astype(self.dtype), self.head_weight(),
                       preferred_element_type=jnp.float32)
        if self.logit_softcap:
            z = self.logit_softcap * jnp.tanh(z / self.logit_softcap)
        return z

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Next-token logits, float32 (batch, length, vocab)."""
        return self.logits(self.hidden_states(ids, mask, deterministic=deterministic))


def layer_indices(cfg: Gemma3Config, layer_type: str) -> list[int]:
    """Indices of the layers of one type (e.g. the global layers 5, 11, 17 of Gemma 3 270M)."""
    return [i for i, t in enumerate(cfg.layer_types) if t == layer_type]
