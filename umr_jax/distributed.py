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

A dead peer (SIGKILL, out of memory, a lost host) must not hang the others.
Left to itself JAX 0.10.2 ends them only through its coordination service:
after `heartbeat_timeout_seconds` (100 s; measured 75-91 s) it aborts every
process with SIGABRT and a fatal log that names no stage. And its barrier
(`multihost_utils.sync_global_devices`, a gloo all-gather) gives up on a
peer that is slow but healthy after XLA's collective timeout, 30 minutes
(measured: "Gloo AllGather failed: ... Timed out waiting 1800000ms"), which
a stage at paper scale can exceed. So every process runs a `PeerMonitor`: a
thread stores a heartbeat in the coordination service's key-value store
every few seconds and another judges the others' (without an RPC, so it
judges even when the coordinator is unreachable). A peer whose heartbeat
has not changed for `reliability.peer_timeout_seconds` is dead: a process
waiting at a barrier raises `PeerLostError` (one line naming the barrier and
the process, exit status `EXIT_STATUS`); one inside a stage or a collective
prints the same line and exits with that status at once. The barrier waits
on the key-value store in 1 s slices, as long as the peer's heartbeats go
on. A peer that exited (an error, a preemption) says so in the store, and a
barrier that waits for it stops within a heartbeat. JAX's own heartbeat
timeout stays on as a backstop, set well above ours. A dead coordinator
(process 0) takes the service with it: JAX ends the others at once (its
fatal log, SIGABRT) when its host closes the connections, else (a frozen or
lost host) our monitor does after peer_timeout_seconds.

A process counts as alive while its heartbeat thread runs: JAX releases the
GIL while it computes, compiles and waits, but a single call that holds the
GIL longer than the timeout would make the process look dead to the others.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
               process_id: int | None = None, environ: Mapping[str, str] = os.environ, *,
               peer_timeout_seconds: float = 120.0, program: str = "umr_jax.main") -> bool:
    """Starts the multi-controller runtime if this is a multi-process run; returns whether it did.

    Explicit flags win; else a detected cluster; else one process (nothing to
    do). Must run before JAX creates its backends. A multi-process run also
    starts this process's `PeerMonitor` (a peer silent for
    `peer_timeout_seconds` is dead; `program` prefixes the message then).
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if not float(peer_timeout_seconds) > 0:
        raise ValueError(f"reliability.peer_timeout_seconds={peer_timeout_seconds}: must be > 0")
    # JAX's heartbeat timeout is the backstop (it aborts every process): well above ours, so that
    # our monitor, which names the stage and the process, always speaks first.
    backstop = {"heartbeat_timeout_seconds": backstop_seconds(float(peer_timeout_seconds))}
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
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id), **backstop)
    else:
        cluster = detected_cluster(environ)
        if cluster is None:
            return False
        logging.info("multi-process environment detected: %s", cluster)
        _cpu_collectives()
        jax.distributed.initialize(**backstop)
    _start_monitor(float(peer_timeout_seconds), program)  # before the backends start (seconds on a TPU host)
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def backstop_seconds(peer_timeout_seconds: float) -> int:
    """JAX's heartbeat timeout for a given peer timeout: twice it plus 30 s."""
    return math.ceil(2 * peer_timeout_seconds) + 30


def _cpu_collectives() -> None:
    """CPU processes talk over gloo (GPU and TPU have their own collectives; the setting is CPU-only)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (a no-op for one process).

    Waits for a slow peer as long as it takes; raises PeerLostError if a peer dies
    or exits meanwhile (the message names `name` and the process).
    """
    from jax._src import distributed as jax_distributed

    if _monitor is not None and _monitor.running:
        _monitor.barrier(name)
    elif jax_distributed.global_state.client is not None and jax.process_count() > 1:
        # JAX started by someone else: its barrier (a gloo collective; XLA gives up after 30 minutes).
        # (No client: one process, and JAX's backends stay uncreated.)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- dead peers

EXIT_STATUS = 69  # EX_UNAVAILABLE: a peer process is gone; re-run the same command on every process
RESUME = "the finished work is saved: re-run the same command on every process to resume"
PREFIX = "umr_jax/"  # of this module's keys in the coordination service's key-value store


class PeerLostError(ConnectionError):
    """Another process of the run died or exited; this one stopped. The program exits with EXIT_STATUS."""


def _processes(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if len(ids) == 1:
        return f"process {ids[0]}"
    return "processes " + ", ".join(map(str, ids[:-1])) + f" and {ids[-1]}"


class PeerMonitor:
    """Heartbeats of every process in the coordination service's key-value store; barriers that notice death.

    `beat` (one thread, every `interval` s) stores this process's heartbeat
    count and reads every process's; `check` (another thread, every second,
    and every barrier between its 1 s slices) finds the peers whose count has
    not changed for `timeout` s on this process's clock. The threads hold
    the GIL only between calls, and JAX releases it while it computes, waits
    in a collective or in the store, so a busy process keeps beating.
    """

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float, *,
                 clock: Callable[[], float] = time.monotonic, slice_seconds: float = 1.0):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, float(timeout)
        self.clock, self.slice_seconds = clock, slice_seconds
        self.interval = min(10.0, max(0.5, self.timeout / 6))
        now = clock()
        self.heard = {q: ("", now) for q in range(num_processes) if q != process_id}  # last count, when it changed
        self.exited: set[int] = set()
        self.beats = 0
        self.sequence = 0  # barriers passed: the same on every process, so barrier keys need no name
        self.waiting_at: str | None = None  # the barrier the main thread waits at
        self.after: str | None = None  # the last barrier passed
        self.exiting = False
        self.running = True
        self.program = "umr_jax.main"  # the prefix of the message when the monitor ends the process
        self.dead: PeerLostError | None = None  # a peer died: JAX's shutdown would wait for it
        self.left: PeerLostError | None = None  # a peer exited while a barrier waited for it
        self.reported = False  # the main thread raised the error (the program prints it)

    # ------------------------------------------------------------- heartbeats

    def beat(self) -> None:
        """Stores this process's next heartbeat and reads everyone's (heartbeats and exits)."""
        self.beats += 1
        self.client.key_value_set(f"{PREFIX}alive/{self.me}", str(self.beats), allow_overwrite=True)
        now = self.clock()
        for key, value in self.client.key_value_dir_get(f"{PREFIX}alive/"):
            q = int(key.rsplit("/", 1)[1])
            if q in self.heard and self.heard[q][0] != value:
                self.heard[q] = (value, now)
        self.exited |= {int(key.rsplit("/", 1)[1]) for key, _ in self.client.key_value_dir_get(f"{PREFIX}exited/")}

    def where(self) -> str:
        if self.waiting_at is not None:
            return f"waited at {self.waiting_at!r}"
        state = "was exiting" if self.exiting else "was working"
        return f"{state} after {self.after!r}" if self.after is not None else f"{state} (before the first barrier)"

    def check(self) -> PeerLostError | None:
        """The error to stop with if a peer is dead (no heartbeat change for `timeout` s), else None."""
        if self.dead is not None:
            return self.dead
        now = self.clock()
        dead = {q: now - t for q, (_, t) in self.heard.items() if q not in self.exited and now - t > self.timeout}
        if dead:
            self.dead = PeerLostError(f"{_processes(list(dead))} of {self.n} stopped responding (no heartbeat "
                                      f"for {int(max(dead.values()))} s) while process {self.me} {self.where()}; "
                                      f"{RESUME}")
        return self.dead

    # ------------------------------------------------------------- barriers

    def barrier(self, name: str) -> None:
        """Waits until every process reached barrier `name`, in slices; raises PeerLostError if one died or exited."""
        key = f"{PREFIX}barrier/{self.sequence}"
        self.sequence += 1
        self.client.key_value_set(f"{key}/{self.me}", name)
        self.waiting_at = name
        try:
            for q in sorted(self.heard):
                value = self._wait_for(f"{key}/{q}", q, name)
                if value != name:
                    raise RuntimeError(f"processes out of step: process {self.me} reached barrier {name!r}, "
                                       f"process {q} barrier {value!r} (both the {self.sequence}th)")
        finally:
            self.waiting_at = None
        self.after = name

    def _wait_for(self, key: str, q: int, name: str) -> str:
        while True:
            try:
                return self.client.blocking_key_value_get(key, int(self.slice_seconds * 1000))
            except Exception as e:  # DEADLINE_EXCEEDED: the slice is over (or the coordinator is unreachable)
                if "DEADLINE_EXCEEDED" not in str(e):
                    time.sleep(self.slice_seconds)
            dead = self.check()
            if dead is not None:
                self.reported = True
                raise dead
            if q in self.exited:
                try:  # it may have passed this barrier before it exited
                    return self.client.key_value_try_get(key)
                except Exception:
                    pass
                self.left = PeerLostError(f"{_processes([q])} of {self.n} exited (see its log) while process "
                                          f"{self.me} waited at {name!r}; {RESUME}")
                raise self.left

    # ------------------------------------------------------------- threads and exit

    def start(self) -> None:
        threading.Thread(target=self._beating, name="umr_jax peer heartbeat", daemon=True).start()
        threading.Thread(target=self._watching, name="umr_jax peer watch", daemon=True).start()

    def _current(self) -> bool:
        """Whether JAX's runtime still runs with our client (a `jax.distributed.shutdown()` ends monitoring)."""
        from jax._src import distributed as jax_distributed
        self.running = self.running and jax_distributed.global_state.client is self.client
        return self.running

    def _beating(self) -> None:
        while self._current():
            try:
                self.beat()
            except Exception as e:  # the coordinator is busy or gone: the others' heartbeats go stale
                logging.log_every_n_seconds(logging.WARNING, "peer heartbeat failed: %s", 60, e)
            time.sleep(self.interval)

    def _watching(self) -> None:
        """Ends the process when a peer is dead: at once, or after a grace if a barrier raises the error."""
        while self._current():
            dead = self.check()
            if dead is not None:
                if self.waiting_at is not None or self.reported:  # the main thread raises it: let it exit
                    time.sleep(max(10.0, 2 * self.slice_seconds))
                if self._current():  # still here: stop now (a collective may never return)
                    self._exit(dead)
                return
            time.sleep(min(1.0, self.interval))

    def _exit(self, dead: PeerLostError) -> None:
        _exit_at_once(None if self.reported else f"{self.program}: error: {dead}")

    def at_exit(self) -> None:
        """Tells the others this process exits; leaves at once (with EXIT_STATUS) if a peer was lost."""
        if not self._current():
            return
        self.exiting = True
        if self.dead is not None:  # JAX's shutdown would wait for the dead peer until its backstop aborts
            self._exit(self.dead)
        if self.left is not None:  # the peer that exited waits in JAX's shutdown barrier: meet it there
            with contextlib.suppress(Exception):
                jax.distributed.shutdown()
            _exit_at_once(None)  # the program printed the error
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{PREFIX}exited/{self.me}", "1", allow_overwrite=True)
        # then JAX's own shutdown: a barrier of every process (the watch thread still ends a wait for the dead)


def _exit_at_once(message: str | None) -> None:
    if message is not None:  # the one line of a user error (umr_jax/cli.py), which absl's log lines precede
        sys.stderr.write(message + "\n")
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_STATUS)


_monitor: PeerMonitor | None = None


def _start_monitor(timeout: float, program: str) -> None:
    from jax._src import distributed as jax_distributed

    global _monitor
    state = jax_distributed.global_state
    if state.client is None:
        return
    _monitor = PeerMonitor(state.client, state.process_id, state.num_processes, timeout)
    _monitor.program = program
    _monitor.start()
    # atexit runs handlers last-registered first: this one before JAX's shutdown (registered at import).
    atexit.register(_monitor.at_exit)
    logging.info("peers: a process silent for %g s is dead (heartbeats every %g s; JAX's backstop %d s)",
                 timeout, _monitor.interval, backstop_seconds(timeout))


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
