"""Nearest-neighbour search: ScaNN vs exact (ours, numpy) vs FAISS, same vectors, one run.

    python bench/ann.py [--sizes=100000,1000000] [--json_out=/tmp/ann.json]

Why: the index backend and the ScaNN defaults in `umr_jax/index.py`
(:func:`umr_jax.index.scann_params`) should come from a measured speed/recall
trade-off, not folklore. This sweeps every contender over its main knobs on the
same clustered synthetic corpus and reports, per method and setting, build time,
index memory, recall@100 against numpy exact search and batched queries/s.

Data: 384-d L2-normalised vectors from a mixture of ~1,000 Gaussian clusters
(centres ~ N(0, I), unequal cluster weights, per-cluster noise scale drawn from
`--noise_range`), queries drawn from the same mixture. The noise is large enough
that a query's 100 nearest neighbours span several clusters (tight clusters keep
theirs, loose ones do not), so partition-based indexes must search more than the
query's own cell and recall really moves with the settings. Rows are generated
in fixed chunks with per-chunk seeds, so the first n rows are identical whatever
`--sizes` is, and every size is a prefix of the largest.

Contenders (all told to use every core):
  * numpy exact: BLAS matmul + argpartition; also the ground truth (in query
    batches, so the score matrix stays small);
  * ours exact: `umr_jax.index.ExactIndex`, corpus rows sharded over one JAX CPU
    device per core, per-device top-k then a global merge;
  * FAISS: IndexFlatIP, IndexIVFFlat (inner product; nlist and nprobe swept),
    IndexHNSWFlat (inner product; efSearch swept), and FAISS's counterpart of
    ScaNN's recipe: IVF-PQ fast-scan with exact refinement,
    `index_factory(d, 'IVF{nlist},PQ{m}x4fs,RFlat', METRIC_INNER_PRODUCT)`
    ('faiss ivfpq-fs': 4-bit PQ codes scanned with in-register SIMD lookup
    tables, then the best k_factor * k candidates rescored exactly against the
    float32 vectors that RFlat keeps, as ScaNN keeps its reorder dataset; m
    sub-quantizers, nprobe and k_factor swept; optionally behind an OPQ rotation);
  * ScaNN via `umr_jax.index.ScannIndex`: tree + anisotropic hashing (AH) +
    exact reordering, spherical partitioning at ~sqrt(n) and ~2 sqrt(n) leaves
    plus one non-spherical tree; one build serves the whole leaves_to_search x
    reorder grid through the per-call overrides of `ScannIndex.search`.

Timing: each setting gets a warm-up call on a query subset, then the best of
`--repeats` batched calls over all queries (numpy and ours exact: over the first
`--exact_queries` queries only, said so in the table); settings faster than
`--min_time` for those calls get a few more calls. Sweeps stop making a knob
costlier once recall reaches `--stop_recall`. Index memory: ScaNN's
serialized directory, `faiss.serialize_index(...).nbytes`, and the float32
matrix for the exact searches; both ScaNN's and the IVF-PQ fast-scan figure
include a full float32 copy of the corpus for the exact rescoring. The last
line is the headline: the best ScaNN q/s at recall@100 >= 0.95 over the best
FAISS q/s (any FAISS index) at recall@100 >= 0.95, at the largest size run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

# One JAX CPU device per core, set before JAX is imported (as bench/encode.py):
# the exact search then shards the corpus rows over the cores, the same code
# path as a TPU slice.
_CPU_DEVICES = int(os.environ.get("UMR_CPU_DEVICES", os.cpu_count() or 1))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_CPU_DEVICES}").strip()

# Runnable as `python bench/ann.py` from a checkout without installing the package.
_REPO = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000"], "Corpus sizes to benchmark, in one run.")
_QUERIES = flags.DEFINE_integer("num_queries", 2000, "Queries, drawn from the same mixture as the corpus.")
_DIM = flags.DEFINE_integer("dim", 384, "Vector dimension.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "Gaussian clusters in the mixture.")
_GROUPS = flags.DEFINE_integer("groups", 50, "Cluster centres come in this many groups (group centres ~ N(0, I)).")
_SPREAD = flags.DEFINE_float("spread", 0.5, "Std of a cluster centre around its group centre.")
_NOISE = flags.DEFINE_list("noise_range", ["1.8", "2.6"],
                           "Per-cluster noise std (per dimension) is uniform in this range.")
_K = flags.DEFINE_integer("k", 100, "Neighbours per query; recall@k is reported.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for data, queries and training samples.")
_EXACT_QUERIES = flags.DEFINE_integer("exact_queries", 200,
                                      "Queries timed for numpy and ours exact (also the warm-up subset size).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per setting after the warm-up; the best counts.")
_MIN_TIME = flags.DEFINE_float("min_time", 1.0,
                               "Fast settings are timed more than --repeats times (at most 10) until the timed "
                               "calls add up to this many seconds: on a shared machine the best of two 0.1s calls "
                               "is mostly noise.")
_THREADS = flags.DEFINE_integer("threads", 0, "Threads for FAISS and ScaNN; 0 = all cores.")
_RECALL = flags.DEFINE_float("recall_target", 0.95, "Recall@k that a setting must reach to compete on speed.")
_SCANN_LEAVES = flags.DEFINE_list("scann_leaf_factors", ["1", "2"],
                                  "ScaNN spherical trees with round(factor * sqrt(n)) leaves.")
_SCANN_GENERIC = flags.DEFINE_bool("scann_generic", True,
                                   "Also a non-spherical ScaNN tree at the first leaf factor, for comparison.")
_SCANN_FRACS = flags.DEFINE_list("scann_search_fracs", ["0.01", "0.015", "0.02", "0.03", "0.05", "0.08"],
                                 "ScaNN leaves_to_search as fractions of num_leaves.")
_SCANN_REORDER = flags.DEFINE_list("scann_reorders", ["100", "200", "300", "500", "1000"],
                                   "ScaNN reorder (AH candidates rescored exactly).")
_IVF_LISTS = flags.DEFINE_list("ivf_list_factors", ["1", "2", "4"], "FAISS IVF nlist = round(factor * sqrt(n)).")
_IVF_FRACS = flags.DEFINE_list("ivf_probe_fracs", ["0.01", "0.015", "0.02", "0.03", "0.05", "0.08"],
                               "FAISS IVF nprobe as fractions of nlist.")
_IVF_TRAIN = flags.DEFINE_integer("ivf_train_per_list", 25,
                                  "FAISS IVF k-means sample: this many points per list (at least "
                                  "--ivf_train_min, at most n), to bound the build time.")
_IVF_TRAIN_MIN = flags.DEFINE_integer("ivf_train_min", 100_000, "Minimum FAISS IVF training sample.")
_HNSW_M = flags.DEFINE_integer("hnsw_m", 32, "FAISS HNSW graph degree M.")
_HNSW_EFC = flags.DEFINE_integer("hnsw_ef_construction", 40, "FAISS HNSW efConstruction.")
_HNSW_EFS = flags.DEFINE_list("hnsw_ef_search", ["100", "200", "400", "800"],
                              "FAISS HNSW efSearch values (FAISS searches with max(efSearch, k)).")
_PQ_LISTS = flags.DEFINE_list("ivfpq_list_factors", ["1"],
                               "FAISS IVF-PQ fast-scan nlist = round(factor * sqrt(n)).")
_PQ_M = flags.DEFINE_list("ivfpq_m", ["96", "192"],
                          "FAISS IVF-PQ fast-scan sub-quantizers of 4 bits (dim / m dims each).")
_PQ_FRACS = flags.DEFINE_list("ivfpq_probe_fracs", ["0.01", "0.015", "0.02", "0.03", "0.05", "0.08"],
                              "FAISS IVF-PQ fast-scan nprobe as fractions of nlist.")
_PQ_KF = flags.DEFINE_list("ivfpq_k_factors", ["2", "3", "5", "10", "20"],
                           "FAISS IVF-PQ fast-scan refine k_factor: k_factor * k PQ candidates rescored exactly "
                           "(ScaNN's reorder / k).")
_PQ_TRAIN = flags.DEFINE_integer("ivfpq_train", 200_000,
                                 "FAISS IVF-PQ fast-scan training sample (coarse k-means and PQ; at most n). "
                                 "ScaNN trains on min(n, 250,000).")
_PQ_OPQ = flags.DEFINE_bool("ivfpq_opq", False,
                            "Also IVF-PQ fast-scan indexes behind an OPQ{m} rotation. Off by default: at 100k it "
                            "left recall unchanged on this isotropic-noise mixture and took 680-950s to build "
                            "instead of 7-26s.")
_STOP = flags.DEFINE_float("stop_recall", 0.995,
                           "A sweep stops making one knob costlier (nprobe, efSearch, ScaNN reorder at fixed leaves, "
                           "IVF-PQ k_factor at fixed nprobe) once a setting reaches this recall: the costlier ones "
                           "cannot be faster at the target.")
_FAISS_ALL = ["flat", "ivf", "hnsw", "ivfpq-fs"]
_FAISS_KINDS = flags.DEFINE_multi_enum("faiss", _FAISS_ALL, _FAISS_ALL, "FAISS index families to sweep (repeat "
                                       "the flag for several; the headline takes the best of those run).")
_JSON = flags.DEFINE_string("json_out", "", "Write every row and the headline numbers here as JSON.")

_MB = 1e6
_CHUNK = 100_000  # rows per generation chunk; each chunk has its own seed


@dataclasses.dataclass
class Row:
    """One method x setting at one corpus size."""

    size: int
    method: str  # 'numpy exact', 'ours exact', 'faiss flat', 'faiss ivf', 'faiss hnsw', 'faiss ivfpq-fs', 'scann'
    index: str  # the built index (what one build covers), e.g. 'nlist=1000'
    setting: str  # the per-search knobs, e.g. 'nprobe=32'
    build_s: float
    memory_mb: float
    recall: float
    qps: float
    timed_queries: int
    params: dict = dataclasses.field(default_factory=dict)
    note: str = ""


# ----------------------------------------------------------------------------- data


def mixture(seed: int, clusters: int, groups: int, dim: int, spread: float,
            noise: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Cluster centres, mixture weights and per-cluster noise scales.

    Centres come in groups (group centre ~ N(0, I), cluster centre = group
    centre + `spread` * N(0, I)), like topics with sub-topics: a query's
    neighbours then spill into the sibling clusters of its group instead of
    being either all in its own cluster (too easy) or spread at random over
    the whole space (isotropic noise, which no partitioning can exploit and
    real embeddings do not look like).
    """
    rng = np.random.default_rng([seed, 0])
    group_centres = rng.standard_normal((groups, dim), dtype=np.float32)
    group_of = rng.integers(0, groups, clusters)
    centres = group_centres[group_of] + spread * rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = np.exp(0.5 * rng.standard_normal(clusters))  # unequal cluster sizes
    scales = rng.uniform(noise[0], noise[1], clusters).astype(np.float32)
    return centres, weights / weights.sum(), scales


def sample(rng: np.random.Generator, count: int, centres: np.ndarray, weights: np.ndarray,
           scales: np.ndarray) -> np.ndarray:
    labels = rng.choice(len(centres), size=count, p=weights)
    x = rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    x *= scales[labels, None]
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n: int, num_queries: int, seed: int, clusters: int, groups: int, dim: int, spread: float,
              noise: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Corpus (n, dim) and queries, float32 and L2-normalised; row i never depends on n."""
    centres, weights, scales = mixture(seed, clusters, groups, dim, spread, noise)
    corpus = np.empty((n, dim), np.float32)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        stop = min(n, start + _CHUNK)
        full = sample(np.random.default_rng([seed, 1, chunk]), _CHUNK, centres, weights, scales)
        corpus[start:stop] = full[: stop - start]
    queries = sample(np.random.default_rng([seed, 2]), num_queries, centres, weights, scales)
    return corpus, queries


# ----------------------------------------------------------------------------- measuring


def numpy_topk(db: np.ndarray, queries: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Exact inner-product top-k, best first, in query batches (the score matrix is batch x n)."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start:start + batch] @ db.T
        idx = np.argpartition(scores, -k, axis=1)[:, -k:]
        order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1)
        out[start:start + batch] = np.take_along_axis(idx, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k per query; ids < 0 (no result) never match."""
    rows, k = truth.shape
    width = int(max(truth.max(), found.max())) + 2  # row offsets keep rows apart, -1 included
    offset = np.arange(rows, dtype=np.int64)[:, None] * width
    hits = np.isin(found[:rows] + offset, truth + offset) & (found[:rows] >= 0)
    return float(hits.sum() / (rows * k))


def timed_search(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, warmup: np.ndarray,
                 repeats: int) -> tuple[float, np.ndarray]:
    """Warm-up call, then the best of >= `repeats` batched calls: (queries/s, ids of the last call).

    Calls continue past `repeats` (up to 10) until the timed calls add up to
    --min_time seconds, so fast settings are not ranked on two noisy samples.
    """
    search(warmup)
    best, total, calls, ids = math.inf, 0.0, 0, None
    while calls < repeats or (total < _MIN_TIME.value and calls < 10):
        start = time.perf_counter()
        ids = search(queries)
        elapsed = time.perf_counter() - start
        best, total, calls = min(best, elapsed), total + elapsed, calls + 1
    return len(queries) / best, ids


def fractions_of(total: int, fracs: list[float]) -> list[int]:
    return sorted({min(total, max(1, round(f * total))) for f in fracs})


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- contenders


def bench_exact(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, mesh) -> list[Row]:
    """numpy (also the ground truth's method) and our sharded on-device exact search."""
    from umr_jax.index import ExactIndex, default_config

    n, dim = db.shape
    sub = queries[: _EXACT_QUERIES.value]
    matrix_mb = n * dim * 4 / _MB
    note = f"timed on {len(sub)} queries"
    qps, ids = timed_search(lambda q: numpy_topk(db, q, k, len(sub)), sub, sub, _REPEATS.value)
    rows = [Row(n, "numpy exact", "float32 matrix", "-", 0.0, matrix_mb, recall_at_k(ids, truth[: len(sub)]),
                qps, len(sub), note=note)]
    log(f"  numpy exact: {qps:.1f} q/s")

    cfg = default_config().exact
    start = time.perf_counter()
    index = ExactIndex(db, mesh, cfg)
    index.db.block_until_ready()
    build = time.perf_counter() - start
    qps, ids = timed_search(lambda q: index.search(q, k, batch=len(sub)).indices, sub, sub, _REPEATS.value)
    rows.append(Row(n, "ours exact", f"{mesh.devices.size} devices", "top_k", build, matrix_mb,
                    recall_at_k(ids, truth[: len(sub)]), qps, len(sub), note=note))
    log(f"  ours exact: {qps:.1f} q/s, recall {rows[-1].recall:.4f}")
    return rows


def bench_hnsw(db: np.ndarray, run: Callable[..., None]) -> None:
    """FAISS HNSW over the efSearch sweep (`run` records its rows)."""
    import faiss
    m, efc = _HNSW_M.value, _HNSW_EFC.value
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(db.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = efc
    hnsw.add(db)
    build = time.perf_counter() - start
    log(f"  faiss hnsw M={m} efC={efc}: built in {build:.1f}s")

    def set_ef(ef: int, hnsw=hnsw) -> Callable[[], None]:
        return lambda: setattr(hnsw.hnsw, "efSearch", ef)

    run(hnsw, "faiss hnsw", f"M={m} efC={efc}", build, [(f"efSearch={ef}", set_ef(int(ef))) for ef in _HNSW_EFS.value],
        {"M": m, "efConstruction": efc})


def bench_faiss(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> list[Row]:
    import faiss

    n, dim = db.shape
    warm = queries[: _EXACT_QUERIES.value]
    rows: list[Row] = []

    def run(index, method: str, label: str, build: float, settings: list[tuple[str, Callable[[], None]]],
            params: dict, memory: float | None = None, note: str = "") -> None:
        """Times `settings` in order, stopping after the first that reaches --stop_recall."""
        if memory is None:
            memory = faiss.serialize_index(index).nbytes / _MB
        for setting, apply in settings:
            apply()
            qps, ids = timed_search(lambda q: index.search(q, k)[1], queries, warm, _REPEATS.value)
            rows.append(Row(n, method, label, setting, build, memory, recall_at_k(ids, truth), qps, len(queries),
                            params=dict(params, setting=setting), note=note))
            log(f"  {method} {label} {setting}: recall {rows[-1].recall:.4f}, {qps:.1f} q/s")
            if rows[-1].recall >= _STOP.value:
                break

    kinds = set(_FAISS_KINDS.value)
    if "flat" in kinds:
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(db)
        run(flat, "faiss flat", "IndexFlatIP", time.perf_counter() - start, [("-", lambda: None)], {})
        del flat
        gc.collect()

    for factor in (float(f) for f in _IVF_LISTS.value if "ivf" in kinds):
        nlist = max(1, round(factor * math.sqrt(n)))
        train_size = min(n, max(_IVF_TRAIN_MIN.value, _IVF_TRAIN.value * nlist))
        rng = np.random.default_rng([_SEED.value, 3, nlist])
        start = time.perf_counter()
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(db[np.sort(rng.choice(n, train_size, replace=False))])
        ivf.add(db)
        build = time.perf_counter() - start
        log(f"  faiss ivf nlist={nlist}: built in {build:.1f}s (k-means on {train_size} points)")

        def set_nprobe(p: int, ivf=ivf) -> Callable[[], None]:
            return lambda: setattr(ivf, "nprobe", p)

        settings = [(f"nprobe={p}", set_nprobe(p)) for p in fractions_of(nlist, [float(f) for f in _IVF_FRACS.value])]
        run(ivf, "faiss ivf", f"nlist={nlist}", build, settings, {"nlist": nlist, "train_size": train_size})
        del ivf, quantizer
        gc.collect()

    if "hnsw" in kinds:
        bench_hnsw(db, run)

    # IVF-PQ fast-scan + exact refine, FAISS's version of ScaNN's AH scan + reorder. One build per
    # (nlist, m, OPQ) serves the nprobe x k_factor grid; ParameterSpace reaches through the refine
    # wrapper (and the OPQ transform) for nprobe, and names the refine's k_factor 'k_factor_rf'.
    space = faiss.ParameterSpace()
    train_size = min(n, _PQ_TRAIN.value)
    k_factors = [int(f) for f in _PQ_KF.value]
    for factor in (float(f) for f in _PQ_LISTS.value if "ivfpq-fs" in kinds):
        nlist = max(1, round(factor * math.sqrt(n)))
        train = db[np.sort(np.random.default_rng([_SEED.value, 4, nlist]).choice(n, train_size, replace=False))]
        for m in (int(v) for v in _PQ_M.value):
            for opq in (False, True) if _PQ_OPQ.value else (False,):
                label = f"{f'OPQ{m},' if opq else ''}IVF{nlist},PQ{m}x4fs,RFlat"
                start = time.perf_counter()
                index = faiss.index_factory(dim, label, faiss.METRIC_INNER_PRODUCT)
                index.train(train)
                index.add(db)
                build = time.perf_counter() - start
                memory = faiss.serialize_index(index).nbytes / _MB
                log(f"  faiss ivfpq-fs {label}: built in {build:.1f}s (trained on {train_size} points), "
                    f"{memory:.0f} MB incl. {n * dim * 4 / _MB:.0f} MB float32 refine vectors")

                def set_knobs(p: int, kf: int, index=index) -> Callable[[], None]:
                    def apply() -> None:
                        space.set_index_parameter(index, "nprobe", p)
                        space.set_index_parameter(index, "k_factor_rf", kf)
                    return apply

                params = {"nlist": nlist, "m": m, "nbits": 4, "opq": opq, "train_size": train_size}
                for p in fractions_of(nlist, [float(f) for f in _PQ_FRACS.value]):
                    before = len(rows)
                    settings = [(f"nprobe={p} k_factor={kf}", set_knobs(p, kf)) for kf in k_factors]
                    run(index, "faiss ivfpq-fs", label, build, settings, dict(params, nprobe=p), memory=memory,
                        note="mem incl. float32 refine vectors")
                    if rows[before].recall >= _STOP.value:  # the cheapest k_factor already stops: more probes only cost
                        break
                del index
                gc.collect()
        del train
        gc.collect()
    return rows


def bench_scann(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, threads: int) -> list[Row]:
    from umr_jax.index import ScannIndex, default_config

    n = len(db)
    warm = queries[: _EXACT_QUERIES.value]
    configs = [(float(f), True) for f in _SCANN_LEAVES.value]
    if _SCANN_GENERIC.value:
        configs.append((configs[0][0], False))
    reorders = [int(r) for r in _SCANN_REORDER.value]
    rows: list[Row] = []
    for factor, spherical in configs:
        cfg = default_config().scann
        cfg.num_leaves = max(1, round(factor * math.sqrt(n)))
        cfg.spherical = spherical
        cfg.dims_per_block = 2
        cfg.anisotropic_threshold = 0.2
        cfg.threads = threads
        start = time.perf_counter()
        index = ScannIndex.build(db, k, cfg)
        build = time.perf_counter() - start
        index.searcher.set_num_threads(threads)
        tmp = tempfile.mkdtemp(prefix="ann-scann-")
        try:
            index.save(os.path.join(tmp, "index"))
            memory = dir_bytes(os.path.join(tmp, "index")) / _MB
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        leaves = index.params["num_leaves"]
        label = f"{'spherical' if spherical else 'generic'} leaves={leaves}"
        log(f"  scann {label}: built in {build:.1f}s, {memory:.0f} MB, params {index.params}")
        for to_search in fractions_of(leaves, [float(f) for f in _SCANN_FRACS.value]):
            for reorder in reorders:
                setting = f"search={to_search} reorder={reorder}"
                params = {"num_leaves": leaves, "leaves_to_search": to_search, "reorder": reorder,
                          "spherical": spherical, "training_sample_size": index.params["training_sample_size"]}

                def search(q: np.ndarray, to_search=to_search, reorder=reorder, index=index) -> np.ndarray:
                    return index.search(q, k, leaves_to_search=to_search, reorder=reorder).indices

                try:
                    qps, ids = timed_search(search, queries, warm, _REPEATS.value)
                except Exception as err:  # a combination ScaNN rejects is a result, not a crash
                    rows.append(Row(n, "scann", label, setting, build, memory, math.nan, math.nan, len(queries),
                                    params=params, note=f"rejected: {err}"))
                    log(f"  scann {label} {setting}: REJECTED {err}")
                    continue
                rows.append(Row(n, "scann", label, setting, build, memory, recall_at_k(ids, truth), qps,
                                len(queries), params=params))
                log(f"  scann {label} {setting}: recall {rows[-1].recall:.4f}, {qps:.1f} q/s")
                if rows[-1].recall >= _STOP.value:
                    break
        del index
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- reporting


def best_at(rows: list[Row], prefix: str, target: float) -> Row | None:
    ok = [r for r in rows if r.method.startswith(prefix) and r.recall >= target and not math.isnan(r.qps)]
    return max(ok, key=lambda r: r.qps) if ok else None


def print_table(n: int, rows: list[Row], truth_s: float) -> None:
    header = (f"{'method':<14} {'index':<30} {'setting':<22} {'build s':>8} {'mem MB':>8} "
              f"{'recall@k':>9} {'q/s':>9}  note")
    print(f"\n=== n = {n:,}: ground truth (numpy exact, all queries) took {truth_s:.1f}s ===")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.method:<14} {r.index:<30} {r.setting:<22} {r.build_s:8.1f} {r.memory_mb:8.0f} "
              f"{r.recall:9.4f} {r.qps:9.1f}  {r.note}")
    print(flush=True)


def describe(r: Row | None) -> str:
    if r is None:
        return "none reaches the target"
    return f"{r.qps:.1f} q/s ({r.method} {r.index} {r.setting}, recall {r.recall:.4f})"


def main(argv):
    del argv
    import faiss
    import jax
    import scann  # noqa: F401  (fail early if missing)

    from umr_jax import sharding

    sizes = sorted(int(s) for s in _SIZES.value)
    threads = _THREADS.value or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    mesh = sharding.make_mesh((-1, 1), ("data", "model"))
    k, target = _K.value, _RECALL.value
    noise = (float(_NOISE.value[0]), float(_NOISE.value[1]))
    log(f"{_QUERIES.value} queries, dim {_DIM.value}, {_CLUSTERS.value} clusters in {_GROUPS.value} groups "
        f"(spread {_SPREAD.value}), noise std {noise}, k={k}, "
        f"sizes {sizes}; {os.cpu_count()} CPU cores, {threads} threads for FAISS/ScaNN, JAX mesh "
        f"{dict(mesh.shape)}; jax {jax.__version__}, faiss {faiss.__version__} "
        f"({faiss.get_compile_options().strip()}), numpy {np.__version__}; load average {os.getloadavg()[0]:.2f}")
    run_start = time.perf_counter()
    start = time.perf_counter()
    corpus, queries = make_data(sizes[-1], _QUERIES.value, _SEED.value, _CLUSTERS.value, _GROUPS.value, _DIM.value,
                                _SPREAD.value, noise)
    log(f"generated {corpus.shape} corpus and {queries.shape} queries in {time.perf_counter() - start:.1f}s")

    all_rows: list[Row] = []
    tables = []
    for n in sizes:
        db = corpus[:n]
        log(f"--- n = {n:,} (load average {os.getloadavg()[0]:.2f}) ---")
        start = time.perf_counter()
        truth = numpy_topk(db, queries, k, _EXACT_QUERIES.value)
        truth_s = time.perf_counter() - start
        log(f"  ground truth in {truth_s:.1f}s")
        rows = bench_exact(db, queries, truth, k, mesh)
        rows += bench_faiss(db, queries, truth, k)
        rows += bench_scann(db, queries, truth, k, threads)
        print_table(n, rows, truth_s)
        tables.append((n, rows, truth_s))
        all_rows += rows

    print("\n==================== summary ====================")
    for n, rows, truth_s in tables:
        print_table(n, rows, truth_s)
    summary = {}
    for n, rows, _ in tables:
        scann_best, faiss_best = best_at(rows, "scann", target), best_at(rows, "faiss", target)
        numpy_qps = next(r.qps for r in rows if r.method == "numpy exact")
        print(f"n = {n:,}: best ScaNN at recall@{k} >= {target}: {describe(scann_best)}")
        print(f"n = {n:,}: best FAISS at recall@{k} >= {target}: {describe(faiss_best)}")
        if scann_best is not None:
            p = scann_best.params
            print(f"n = {n:,}: winning ScaNN setting: num_leaves={p['num_leaves']}, "
                  f"leaves_to_search={p['leaves_to_search']}, reorder={p['reorder']}, spherical={p['spherical']}")
        for label in dict.fromkeys(r.index for r in rows if r.method == "scann"):
            best = best_at([r for r in rows if r.index == label], "scann", target)
            print(f"    scann {label}: {describe(best)}")
        faiss_bests = {m: best_at([r for r in rows if r.method == m], m, target)
                       for m in dict.fromkeys(r.method for r in rows if r.method.startswith("faiss"))}
        for method, best in faiss_bests.items():
            print(f"    {method}: {describe(best)}")
        summary[n] = {
            "scann_best": dataclasses.asdict(scann_best) if scann_best else None,
            "faiss_best": dataclasses.asdict(faiss_best) if faiss_best else None,
            "faiss_best_by_method": {m: dataclasses.asdict(b) if b else None for m, b in faiss_bests.items()},
            "numpy_exact_qps": numpy_qps,
            "scann_vs_faiss": scann_best.qps / faiss_best.qps if scann_best and faiss_best else math.nan,
            "scann_vs_numpy": scann_best.qps / numpy_qps if scann_best else math.nan,
        }
    largest = sizes[-1]
    head = summary[largest]
    label = "at 1M vectors" if largest == 1_000_000 else f"at the largest size run, n = {largest:,}"
    total = time.perf_counter() - run_start
    print(f"\nheadline {label}: ScaNN / FAISS q/s at recall@{k} >= {target} = {head['scann_vs_faiss']:.2f}; "
          f"ScaNN / numpy exact q/s = {head['scann_vs_numpy']:.2f}")
    print(f"total runtime {total / 60:.1f} min")
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump({"flags": {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])},
                       "sizes": sizes, "threads": threads, "noise_range": noise, "k": k,
                       "recall_target": target, "total_seconds": total,
                       "rows": [dataclasses.asdict(r) for r in all_rows],
                       "summary": {str(n): s for n, s in summary.items()}}, f, indent=1)
        print(f"wrote {_JSON.value}")
    print(f"scann_qps_vs_numpy_exact_at_recall95: {head['scann_vs_numpy']:.2f}")
    print(f"scann_qps_vs_faiss_at_recall95: {head['scann_vs_faiss']:.2f}")


if __name__ == "__main__":
    app.run(main)
