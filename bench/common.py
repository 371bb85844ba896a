"""What every benchmark shares: CPU device setup, timing, the matmul peak, XQuAD-R texts.

Import this module before JAX: it gives JAX one CPU device per core (data
parallelism over the cores beats one device with multi-threaded ops: each
device then runs whole programs on its core, with no per-op synchronisation),
the same mesh code path as a TPU slice.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

CPU_DEVICES = int(os.environ.get("UMR_CPU_DEVICES", os.cpu_count() or 1))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Runnable as `python bench/x.py` from a checkout without installing the package.
REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA_DIR = str(REPO.parent / "shared" / "data")
XQUAD_R_LANGS = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls (the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_matmul_peak(mesh, dtype: str = "float32") -> tuple[float, float]:
    """2048^3 matmul FLOP/s in `dtype` (float32 accumulation): on one device, and data-parallel over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    n = mesh.devices.size
    b = jnp.ones((2048, 2048), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    a1 = jax.device_put(jnp.ones((2048, 2048), dtype), mesh.devices.flat[0])
    f(a1, b).block_until_ready()
    single = 2 * 2048 ** 3 / best_time(lambda: f(a1, b).block_until_ready(), 5)
    an = jax.device_put(jnp.ones((n * 2048, 2048), dtype), NamedSharding(mesh, PartitionSpec("data")))
    bn = jax.device_put(b, NamedSharding(mesh, PartitionSpec()))
    f(an, bn).block_until_ready()
    parallel = 2 * n * 2048 ** 3 / best_time(lambda: f(an, bn).block_until_ready(), 5)
    return single, parallel


def model_flops(token_lengths, hidden: int, ffn: int, layers: int) -> float:
    """BERT forward FLOPs on real (unpadded) tokens: projections, FFN and attention (each text alone)."""
    total = 0.0
    for n in token_lengths:
        per_layer = 2 * n * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * n * n * hidden
        total += layers * per_layer
    return total


def machine(dtype: str | None = None) -> str:
    """CPU model, cores, bf16 units and the compute dtype: every figure must name the machine kind it came from
    (a Xeon with AMX runs `dtype='auto'` in bfloat16; an AVX2-only EPYC, or a Xeon whose bf16 is AVX512-BF16
    alone, runs it in float32)."""
    from umr_jax.models.layers import cpu_flags  # after this module has set XLA_FLAGS

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    widest = next((f for f in ("avx512f", "avx2") if f in flags), "no AVX2")
    kind = f"bf16 units: {'yes (' + ', '.join(units) + ')' if units else 'no'}; widest vectors {widest}"
    return f"{model}, {os.cpu_count()} cores; {kind}" + (f"; dtype {dtype}" if dtype else "")


class ForeignLoad:
    """How many cores other processes kept busy while we ran: the machine's busy time (/proc/stat) minus
    ours (os.times), over the wall time. The machine is shared; a figure well above 0 means noisy timings."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def cores(self) -> float:
        wall, busy, ours = (b - a for a, b in zip(self.start, self._now(), strict=True))
        return max(0.0, (busy - ours) / wall)


def xquad_r_paragraphs(data_dir: str | pathlib.Path) -> list[tuple[str, dict]]:
    """(language, SQuAD-style paragraph with 'sentences' and 'qas') over all 11 languages."""
    out = []
    for lang in XQUAD_R_LANGS:
        path = pathlib.Path(data_dir) / "xquad-r" / f"{lang}.json"
        if not path.is_file():
            sys.exit(f"{path}: missing; pass --data_dir pointing at the folder holding xquad-r/")
        for article in json.loads(path.read_text("utf-8"))["data"]:
            out.extend((lang, para) for para in article["paragraphs"])
    return out
