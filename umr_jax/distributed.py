"""Multi-controller JAX: one process per host, and how a UMR run splits its stages across them.

    python -m umr_jax.main --config=configs/xor.py --workdir=/shared/run        # TPU pod / SLURM: detected
    python -m umr_jax.main ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # by hand

Every process runs the same program on a workdir that all of them see (NFS,
Filestore, a gcsfuse mount). The stages divide the work (umr_jax/main.py):

  encode    process p encodes the corpus chunks c with c % n == p (its shard)
  index     each process indexes its own shard (`index/shard-p-of-n/`)
  retrieve  every process searches all queries on its shard; process 0 merges
            the per-shard top-k into the global top-k
  teacher   process p scores the pair chunks c with c % n == p; all read all
  train     one mesh over every device of every process: data parallel with a
            global batch that each process builds identically from (seed, step)
  the rest  evaluation, the manifest, reports and export: process 0 writes

Files are the exchange medium (the workdir is shared and every write is
atomic), and the processes meet at a barrier after each stage, so a killed
multi-process run resumes like a single-process one. Encoding, search and
scoring run on a mesh of each process's own devices; only training needs
collectives across hosts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process environment `jax.distributed.initialize()` configures itself from, if any."""
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return "slurm"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu pod"
    if environ.get("UMR_JAX_DISTRIBUTED") == "1":  # any other cluster JAX detects (e.g. MPI, GKE)
        return "forced"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Starts the multi-controller runtime if this is a multi-process run; returns whether it did.

    Explicit flags win; else a detected cluster; else one process (nothing to
    do). Must run before JAX creates its backends.
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process flags: give all of --coordinator_address, --num_processes and "
                             f"--process_id (missing {', '.join(missing)})")
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        if int(num_processes) == 1:
            return False
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    else:
        cluster = detected_cluster(environ)
        if cluster is None:
            return False
        logging.info("multi-process environment detected: %s", cluster)
        _cpu_collectives()
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def _cpu_collectives() -> None:
    """CPU processes talk over gloo (GPU and TPU have their own collectives; the setting is CPU-only)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def global_put(tree: Any, shardings: Any) -> Any:
    """Places values that every process holds identically (host arrays or local jax.Arrays) on global shardings.

    `jax.device_put` cannot move a process-local array onto devices of other
    processes; building each addressable shard from the local copy can.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def host_value(x: jax.Array) -> np.ndarray:
    """The full value of an array that may span other processes' devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
