"""Building blocks shared by every model family: dtypes, annotated parameters, norms.

Each model lives in one file (MaxText-style); what is here is only what would
otherwise be copied verbatim between them. Parameters carry logical axis names
(``out_sharding`` metadata) that :mod:`umr_jax.sharding` maps onto the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """Maps a config string to a dtype with an error that lists the choices."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def hardware_has_bf16() -> bool:
    """Whether the default backend multiplies bfloat16 faster than float32 (TPU, GPU, CPUs with AMX).

    A CPU with AVX512-BF16 but no AMX is not enough: XLA's bfloat16 matmuls
    there run at about half the float32 rate (a 2048^3 bf16 x bf16 -> f32 dot
    162 GFLOP/s against 288 in float32 on a 2-core Xeon), so "auto" dtypes
    pick float32 on it, as on CPUs without any bf16 units.
    """
    platform = jax.default_backend()
    if platform in ("tpu", "gpu", "cuda", "rocm"):
        return True
    return "amx_bf16" in cpu_flags()


def cpu_flags() -> frozenset[str]:
    """The feature flags /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def resolve_auto_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' where the hardware has bf16 units, else 'float32'; other names unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if hardware_has_bf16() else "float32"


def annotated(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with logical axes; placement is :mod:`umr_jax.sharding`'s job.

    Eager sharding is off so that building a model needs no mesh: the same
    module is created on the host, loaded from a checkpoint, then placed.
    """
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def random_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: jnp.dtype,
                 random_init: bool = True, stddev: float = 0.02) -> nnx.Param:
    """Normal-initialised parameter, or zeros when weights are loaded right after.

    Skipping the random draw matters then: sampling a 250k x 768 table takes
    seconds on a CPU host, and the checkpoint overwrites it anyway.
    """
    if not random_init:
        # A host placeholder (numpy's zeros are untouched pages, so not even host memory): the checkpoint's
        # tensor replaces it, placed shard by shard on the mesh (state_dict.load_state_dict), so no device
        # ever holds a whole parameter of a model larger than one chip.
        return annotated(np.zeros(shape, jnp.dtype(dtype)), axes)
    return annotated(nnx.initializers.normal(stddev=stddev)(rngs.params(), shape, dtype), axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm in float32 whatever the activation dtype.

    `offset` is 0 for T5 (x * w) and 1 for Gemma (x * (1 + w), the Hugging
    Face convention in which a zero weight is the identity).
    """

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, offset: float = 0.0,
                 axes: tuple[str | None, ...] = ("embed",)):
        self.eps = eps
        self.offset = offset
        init = jnp.zeros if offset else jnp.ones
        self.scale = annotated(init((dim,), param_dtype), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def mixed_dot(equation: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Einsum in `dtype` with float32 accumulation, cast back to `dtype`.

    Asking for a float32 result is what sends bfloat16 matmuls to the CPU's
    bf16 units (AMX/AVX512-BF16 through oneDNN: ~2x the float32 rate here, vs
    no gain with a bfloat16 result) and is what TPUs do natively anyway.
    """
    return jnp.einsum(equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def softmax_attention(logits: jax.Array, v: jax.Array, equation: str, dtype: jnp.dtype,
                      dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """softmax(logits) @ v, normalised after the matmul: `equation` contracts (..., q, k) with v.

    Dividing the (q, head_dim) output by the row sums instead of the (q, k)
    probabilities is the same function (flash attention does it too) with a
    k/head_dim times smaller division, and it lets XLA's CPU backend fuse
    exp and the second matmul: 35% less time for the whole attention at
    e5-small shapes (rows of 128, head_dim 32) on a 2-core Xeon, float32.
    The max is subtracted first, as in ``jax.nn.softmax``, so fully masked
    rows stay uniform rather than NaN. Dropout, elementwise, commutes with
    the division: it is applied to the unnormalised weights.
    """
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    totals = weights.sum(-1, keepdims=True)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum(equation, weights.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return (out / totals).astype(dtype)


def run_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *args: Any, scan: bool, deterministic: bool) -> jax.Array:
    """`x` through `blocks` in order; with `scan`, blocks 2..n as one `lax.scan` over their stacked weights.

    A scanned layer loop is traced and compiled once instead of once per layer
    (MaxText's scan_layers): compile time stops growing with depth. The weights
    keep their per-layer layout (checkpoints, sharding and export do not
    change); they are stacked inside the program. The first block runs alone
    because it may differ (a T5 stack's first block owns the relative position
    table). Only inference scans: a scanned block would draw the same dropout
    mask in every layer, so with dropout on the loop runs unrolled.
    """
    if not scan or not deterministic or len(blocks) < 3:
        for block in blocks:
            x = block(x, *args, deterministic=deterministic)
        return x
    x = blocks[0](x, *args, deterministic=deterministic)
    graphdef, _ = nnx.split(blocks[1])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks[1:]])

    def body(h: jax.Array, state: Any) -> tuple[jax.Array, None]:
        return nnx.merge(graphdef, state)(h, *args, deterministic=True), None

    x, _ = jax.lax.scan(body, x, stacked)
    return x


def set_scan_layers(module: nnx.Module, scan: bool) -> None:
    """Turns layer scanning (run_blocks) on or off in every submodule that has a `scan_layers` switch."""
    for _, sub in module.iter_modules():
        if hasattr(sub, "scan_layers"):
            sub.scan_layers = scan
