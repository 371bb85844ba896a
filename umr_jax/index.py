"""Nearest-neighbour search over passage embeddings: ScaNN and exact on-device.

Both backends answer `search(queries, k) -> SearchResult` (inner-product
scores, best first) and save/load to a directory with a small `index.json`,
so a round can rebuild, persist and reload its index without caring which
backend the config picked.

- `ScannIndex`: tree partitioning + anisotropic hashing + exact reordering.
  Parameters left at 0 in the config are derived from the corpus size
  (:func:`scann_params`); defaults come from the sweep in `bench/ann.py`.
- `ExactIndex`: the corpus sharded by rows over every device of the mesh; each
  device scores its rows and keeps a local top-k (`lax.top_k`, or
  `lax.approx_max_k`, the TPU-native partial reduction), then the k candidates
  of every device are gathered and reduced to the global top-k. Only
  devices x k candidates per query ever leave a device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from umr_jax import atomic, storage

BACKENDS = ("scann", "exact")


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.backend = "scann"  # 'scann' | 'exact' (on-device matmul + top-k)
    cfg.query_batch = 1024  # queries per search call
    cfg.exact = ml_collections.ConfigDict()
    cfg.exact.approx = False  # lax.approx_max_k per device instead of an exact top-k
    cfg.exact.recall_target = 0.95  # for approx_max_k
    cfg.exact.dtype = "float32"  # corpus dtype on device ('bfloat16' halves memory on TPU)
    cfg.scann = ml_collections.ConfigDict()
    # 0 = derived from the corpus size, see scann_params().
    cfg.scann.num_leaves = 0
    cfg.scann.leaves_to_search = 0
    cfg.scann.leaves_fraction = 0.03  # when leaves_to_search = 0: search at least this share of leaves
    cfg.scann.points_per_neighbour = 50  # ... and leaves holding at least this many points per k
    cfg.scann.reorder = 0
    cfg.scann.training_sample_size = 0
    cfg.scann.spherical = True  # spherical k-means suits normalised/inner-product embeddings
    cfg.scann.dims_per_block = 2  # AH: 2 dims per 4-bit code (lut16)
    cfg.scann.anisotropic_threshold = 0.2
    cfg.scann.brute_force_below = 5000  # smaller corpora: exact scoring inside ScaNN
    cfg.scann.threads = 0  # 0 = all cores
    return cfg


@dataclasses.dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (queries, k) float32, descending
    indices: np.ndarray  # (queries, k) int64 rows of the indexed embeddings


class SearchIndex(Protocol):
    size: int

    def search(self, queries: np.ndarray, k: int) -> SearchResult: ...

    def save(self, directory: str) -> None: ...


def _check_queries(queries: np.ndarray, dim: int, k: int, size: int) -> np.ndarray:
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (n, {dim}), got {queries.shape}")
    if not 0 < k <= size:
        raise ValueError(f"k={k} must be in [1, {size}] (the index size)")
    return queries


# ----------------------------------------------------------------------------- ScaNN


def scann_params(n: int, k: int, cfg: ml_collections.ConfigDict) -> dict:
    """Tree/AH/reorder parameters for `n` vectors; explicit config values win.

    Leaves ~ sqrt(n) keep both the centroid scan and the leaf scan near
    sqrt(n) work per query. The leaves searched must cover a fraction of the
    leaves (3%, at least 16) and, on small corpora, enough points for k:
    ~50 k points. Real text embeddings are anisotropic (e5's mean cosine is
    0.8), so a query's neighbours spread over many leaves; on the 13k XQuAD-R
    pool, 40% of the leaves give recall@100 0.97 where 14% give 0.85.
    Reordering max(10 k, 400) AH candidates in float32 restores exact scores:
    the 4-bit AH scores alone cap recall@100 by the reorder count (bench/ann.py
    at 1M clustered vectors: reorder 300 -> 0.85, 500 -> 0.94, 1000 -> 0.99 with
    30 of 1,000 leaves searched).
    """
    num_leaves = int(cfg.num_leaves) or max(16, round(math.sqrt(n)))
    num_leaves = min(num_leaves, max(1, n // 20))
    cover = max(float(cfg.leaves_fraction), min(1.0, float(cfg.points_per_neighbour) * k / n))
    to_search = int(cfg.leaves_to_search) or max(16, math.ceil(num_leaves * cover))
    return {
        "num_leaves": num_leaves,
        "leaves_to_search": min(to_search, num_leaves),
        "reorder": int(cfg.reorder) or max(10 * k, 400),
        "training_sample_size": int(cfg.training_sample_size) or min(n, 250_000),
    }


class ScannIndex:
    def __init__(self, searcher, size: int, dim: int, params: dict):
        self.searcher, self.size, self.dim, self.params = searcher, size, dim, params

    @classmethod
    def build(cls, embeddings: np.ndarray, k: int, cfg: ml_collections.ConfigDict) -> ScannIndex:
        from scann.scann_ops.py import scann_ops_pybind
        db = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = db.shape
        start = time.perf_counter()
        builder = scann_ops_pybind.builder(db, k, "dot_product")
        if n < int(cfg.brute_force_below):
            params: dict = {"brute_force": True}
            builder = builder.score_brute_force()
        else:
            params = scann_params(n, k, cfg)
            builder = (builder.tree(params["num_leaves"], params["leaves_to_search"],
                                    training_sample_size=params["training_sample_size"], spherical=cfg.spherical)
                       .score_ah(int(cfg.dims_per_block), anisotropic_quantization_threshold=cfg.anisotropic_threshold)
                       .reorder(params["reorder"]))
            params.update(spherical=bool(cfg.spherical), dims_per_block=int(cfg.dims_per_block))
        if cfg.threads:
            builder = builder.set_n_training_threads(int(cfg.threads))
        searcher = builder.build()
        logging.info("ScaNN index over %d x %d in %.1fs: %s", n, dim, time.perf_counter() - start, params)
        return cls(searcher, n, dim, params)

    def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
               reorder: int | None = None) -> SearchResult:
        queries = _check_queries(queries, self.dim, k, self.size)
        kwargs = {"final_num_neighbors": k}
        if not self.params.get("brute_force"):
            kwargs["leaves_to_search"] = leaves_to_search or self.params["leaves_to_search"]
            kwargs["pre_reorder_num_neighbors"] = max(reorder or self.params["reorder"], k)
        indices, scores = self.searcher.search_batched_parallel(queries, **kwargs)
        return SearchResult(np.asarray(scores, np.float32), np.asarray(indices, np.int64))

    def save(self, directory: str) -> None:
        def write(tmp: str) -> None:
            self.searcher.serialize(tmp, relative_path=True)
            atomic.write_json(os.path.join(tmp, "index.json"), {
                "backend": "scann", "size": self.size, "dim": self.dim, "params": self.params})
        atomic.replace_dir(directory, write, commit="index.json", sole_writer=True)

    @classmethod
    def load(cls, directory: str, meta: dict) -> ScannIndex:
        from scann.scann_ops.py import scann_ops_pybind
        with storage.local_copy(directory) as local:  # ScaNN reads a local directory (a bucket's: downloaded)
            searcher = scann_ops_pybind.load_searcher(local)
        return cls(searcher, meta["size"], meta["dim"], meta["params"])


# ----------------------------------------------------------------------------- exact, on device


def _row_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, k: int, rows_per_device: int, size: int, approx: bool, recall_target: float):
    axes = _row_axes(mesh)

    def local_topk(db, queries):
        scores = jnp.einsum("qd,nd->qn", queries.astype(db.dtype), db, preferred_element_type=jnp.float32)
        shard = jax.lax.axis_index(axes)
        rows = shard * rows_per_device + jnp.arange(rows_per_device)
        scores = jnp.where(rows[None, :] < size, scores, -jnp.inf)  # padding rows never win
        # A device holds fewer than k rows on tiny corpora; the gathered
        # devices x local_k >= corpus size >= k candidates still suffice.
        local_k = min(k, rows_per_device)
        if approx:
            top, idx = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target)
        else:
            top, idx = jax.lax.top_k(scores, local_k)
        idx = idx + shard * rows_per_device
        all_top = jax.lax.all_gather(top, axes, axis=1, tiled=True)  # (q, devices * k)
        all_idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
        best, pos = jax.lax.top_k(all_top, k)
        return best, jnp.take_along_axis(all_idx, pos, axis=1)

    fn = jax.shard_map(local_topk, mesh=mesh, in_specs=(PartitionSpec(axes, None), PartitionSpec()),
                       out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    return jax.jit(fn)


class ExactIndex:
    """The embedding matrix itself, sharded by rows; saving it writes only index.json, since the embedding
    store it was built from is its data (a second copy would be 55 GB a round at paper scale)."""

    def __init__(self, embeddings: np.ndarray, mesh: Mesh, cfg: ml_collections.ConfigDict):
        self.size, self.dim = embeddings.shape
        self.mesh, self.cfg = mesh, cfg
        devices = mesh.devices.size
        self.rows_per_device = -(-self.size // devices)
        sharding = NamedSharding(mesh, PartitionSpec(_row_axes(mesh), None))
        rows = self.rows_per_device * devices
        if rows == self.size and embeddings.dtype == np.dtype(cfg.dtype):
            self.db = jax.device_put(embeddings, sharding)
        else:  # padding rows (and a dtype cast), built one device's block at a time: no padded host copy

            def block(index: tuple[slice, ...]) -> np.ndarray:
                start, stop, _ = index[0].indices(rows)
                out = np.zeros((stop - start, self.dim), cfg.dtype)
                part = embeddings[start:min(stop, self.size)]
                out[: len(part)] = part
                return out

            self.db = jax.make_array_from_callback((rows, self.dim), sharding, block)

    def search(self, queries: np.ndarray, k: int, *, batch: int = 1024, progress: bool = False) -> SearchResult:
        queries = _check_queries(queries, self.dim, k, self.size)
        fn = _search_fn(self.mesh, k, self.rows_per_device, self.size, bool(self.cfg.approx),
                        float(self.cfg.recall_target))
        scores = np.zeros((len(queries), k), np.float32)
        indices = np.zeros((len(queries), k), np.int64)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        for start in tqdm(range(0, len(queries), batch), desc="search", disable=not progress):
            q = queries[start:start + batch]
            padded = np.zeros((batch, self.dim), np.float32)  # one compiled shape for every batch
            padded[: len(q)] = q
            s, i = fn(self.db, jax.device_put(padded, replicated))
            scores[start:start + len(q)] = np.asarray(s)[: len(q)]
            indices[start:start + len(q)] = np.asarray(i)[: len(q)]
        return SearchResult(scores, indices)

    def save(self, directory: str) -> None:
        def write(tmp: str) -> None:
            atomic.write_json(os.path.join(tmp, "index.json"), {
                "backend": "exact", "size": self.size, "dim": self.dim,
                "data": "the embedding store it was built from"})
        atomic.replace_dir(directory, write, commit="index.json", sole_writer=True)

    @classmethod
    def load(cls, directory: str, meta: dict, mesh: Mesh, cfg: ml_collections.ConfigDict,
             embeddings: np.ndarray) -> ExactIndex:
        if embeddings.shape != (meta["size"], meta["dim"]):
            raise ValueError(f"{directory}/index.json: an exact index of {meta['size']} x {meta['dim']}, but its "
                             f"embeddings are {embeddings.shape}: the store changed since; delete {directory}")
        return cls(embeddings, mesh, cfg)


# ----------------------------------------------------------------------------- one entry point


def build_index(embeddings: np.ndarray, cfg: ml_collections.ConfigDict, mesh: Mesh | None = None,
                k: int = 100) -> SearchIndex:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"index.backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"need a non-empty (n, dim) embedding matrix, got {embeddings.shape}")
    if cfg.backend == "scann":
        return ScannIndex.build(embeddings, k, cfg.scann)
    if mesh is None:
        raise ValueError("the exact backend needs a mesh")
    return ExactIndex(embeddings, mesh, cfg.exact)


def load_index(directory: str, cfg: ml_collections.ConfigDict, mesh: Mesh | None = None,
               embeddings: Callable[[], np.ndarray] | None = None) -> SearchIndex:
    """A saved index; an exact one is rebuilt from `embeddings()` (the store it was built from)."""
    marker = os.path.join(directory, "index.json")
    if not storage.exists(marker):
        raise FileNotFoundError(f"{directory}: no index.json; the index was never saved completely")
    meta = atomic.read_json(marker)
    if meta.get("backend") == "scann":
        return ScannIndex.load(directory, meta)
    if meta.get("backend") == "exact":
        if mesh is None or embeddings is None:
            raise ValueError("an exact index is rebuilt from its embeddings on a mesh: pass both")
        return ExactIndex.load(directory, meta, mesh, cfg.exact, embeddings())
    raise ValueError(f"{marker}: unknown backend {meta.get('backend')!r}")


def search_all(index: SearchIndex, queries: np.ndarray, k: int, batch: int = 1024,
               progress: bool = True) -> SearchResult:
    """Batched search with a progress bar, for either backend."""
    parts = [index.search(queries[s:s + batch], k)
             for s in tqdm(range(0, len(queries), batch), desc="search", unit="batch", disable=not progress)]
    if not parts:
        return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return SearchResult(np.concatenate([p.scores for p in parts]), np.concatenate([p.indices for p in parts]))
