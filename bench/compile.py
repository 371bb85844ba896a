"""Compile time of the paper's models with the layer loop unrolled and as one scanned block.

    python bench/compile.py                # mBERT-base (the retriever) and mT5-XL (the teacher), ~5 min

XLA compiles an unrolled layer loop once per layer, so compile time grows with
depth; `retriever.scan_layers` / `teacher.scan_layers` run a stack's blocks as
one `lax.scan` (models.layers.run_blocks), compiled once. Nothing is allocated:
the models are built abstractly (nnx.eval_shape) at the paper's shapes and each
forward is lowered and compiled for the CPU, at the batch shapes of
configs/xor.py's encoding (64 passages x 256 tokens) and teacher scoring
(8 pairs x 256 input and 32 target tokens). Printed per model and setting:
tracing + lowering seconds and XLA compile seconds. Last line:
`compile_speedup_with_scan: X`, the unrolled over the scanned total compile
seconds summed over both models.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

import common  # noqa: F401  (device setup before JAX)
from umr_jax.models.bert import BertConfig, BertEncoder
from umr_jax.models.layers import set_scan_layers
from umr_jax.models.t5 import T5Config
from umr_jax.models.t5_weights import build_mt5

MBERT_BASE = BertConfig(vocab_size=119_547, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
MT5_XL = T5Config(vocab_size=250_112, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
                  num_decoder_layers=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def compile_seconds(build, call, inputs: list[jax.ShapeDtypeStruct], scan: bool) -> tuple[float, float]:
    """(trace + lower, compile) seconds of `call(model, *inputs)` for an abstract model."""
    model = nnx.eval_shape(build)
    set_scan_layers(model, scan)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: call(nnx.merge(graphdef, state), *args))
    start = time.perf_counter()
    lowered = fn.lower(state, *inputs)
    traced = time.perf_counter() - start
    lowered.compile()
    return traced, time.perf_counter() - start - traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mbert,mt5", help="mbert, mt5 or both")
    args = parser.parse_args()
    ids = lambda b, n: jax.ShapeDtypeStruct((b, n), jnp.int32)  # noqa: E731
    cases = {
        "mbert": ("mBERT-base encode (64 x 256)",
                  lambda: BertEncoder(MBERT_BASE, rngs=nnx.Rngs(0)),
                  lambda m, i, k: m(i, k, deterministic=True), [ids(64, 256), ids(64, 256)]),
        "mt5": ("mT5-XL teacher forward (8 x 256 -> 32)",
                lambda: build_mt5(MT5_XL, seed=0),
                lambda m, i, k, d, dk: m(i, k, d, dk, deterministic=True),
                [ids(8, 256), ids(8, 256), ids(8, 32), ids(8, 32)]),
    }
    totals = {False: 0.0, True: 0.0}
    print(f"{'model':42s} {'layers':>14s} {'trace+lower s':>14s} {'compile s':>10s}")
    for name in args.models.split(","):
        title, build, call, inputs = cases[name]
        for scan in (False, True):
            traced, compiled = compile_seconds(build, call, inputs, scan)
            totals[scan] += compiled
            print(f"{title:42s} {'scanned' if scan else 'unrolled':>14s} {traced:14.1f} {compiled:10.1f}", flush=True)
    print(f"compile_speedup_with_scan: {totals[False] / totals[True]:.2f}")


if __name__ == "__main__":
    main()
