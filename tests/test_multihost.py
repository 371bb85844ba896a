"""Multi-host: two JAX processes on localhost (gloo collectives) run the tiny config like one process does."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import ROOT
from umr_jax import distributed, run_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _assert_two_process_run_equals_the_single_process_run(workdir: pathlib.Path, tiny_run: pathlib.Path) -> None:
    """What a 2-process run of the tiny config must leave (the dead-peer test's re-run is one, to the end)."""
    # Each process did its share: its own embedding chunks, index shard and rankings; the pair chunks split.
    # Chunks of 16 of the 96 passages (CHUNKS): three committed chunks a process, joined in corpus order.
    embeddings = workdir / "round-0" / "embeddings"
    assert (embeddings / "done-0-of-2.json").exists() and (embeddings / "done-1-of-2.json").exists()
    assert sorted(p.name for p in embeddings.glob("chunk-*.json")) == [f"chunk-{c:06d}.json" for c in range(6)]
    assert [json.loads((embeddings / f"chunk-{c:06d}.json").read_text())["count"] for c in range(6)] == [16] * 6
    assert (workdir / "round-0" / "index" / "shard-1-of-2" / "index.json").exists()
    parts = [run_files.read_jsonl(str(workdir / "round-0" / "shards" / f"run-dev-{p}-of-2.jsonl")) for p in (0, 1)]
    assert not set(parts[0][0].passage_ids) & set(parts[1][0].passage_ids)
    # The merged global top-k equals the single-process search, and so do the metrics of every round.
    for r in range(3):
        ours = run_files.read_jsonl(str(workdir / f"round-{r}" / "run-dev.jsonl"))
        reference = run_files.read_jsonl(str(tiny_run / f"round-{r}" / "run-dev.jsonl"))
        assert [x.passage_ids for x in ours] == [x.passage_ids for x in reference], f"round {r}"
        np.testing.assert_allclose([x.scores for x in ours], [x.scores for x in reference], atol=1e-5)
    np.testing.assert_allclose(np.load(workdir / "round-2" / "teacher" / "scores.npy"),
                               np.load(tiny_run / "round-2" / "teacher" / "scores.npy"), atol=1e-5)
    _assert_close_result(workdir, tiny_run)


def _assert_close_result(workdir: pathlib.Path, reference_dir: pathlib.Path) -> None:
    """Two processes reduce in another order than one: the same metrics and towers up to float rounding."""
    metrics = json.loads((workdir / "metrics.json").read_text())["dev"]
    reference = json.loads((reference_dir / "metrics.json").read_text())["dev"]
    for r, table in reference.items():
        for lang, row in table.items():
            for name, value in row.items():
                assert metrics[r][lang][name] == pytest.approx(value, abs=1e-6), (r, lang, name)
    for tower in ("query", "passage"):
        ours = load_file(workdir / "export" / tower / "model.safetensors")
        for name, value in load_file(reference_dir / "export" / tower / "model.safetensors").items():
            np.testing.assert_allclose(ours[name], value, atol=1e-5, err_msg=f"{tower} {name}")


def test_merged_shard_rankings_are_the_global_top_k():
    a = [run_files.Ranking("q", "en", ["a1", "a2", "a3"], [0.9, 0.5, 0.1])]
    b = [run_files.Ranking("q", "en", ["b1", "b2"], [0.7, 0.5])]
    merged = run_files.merge_rankings([a, b], 4)
    assert merged[0].passage_ids == ["a1", "b1", "a2", "b2"] and merged[0].scores == [0.9, 0.7, 0.5, 0.5]
    with pytest.raises(ValueError, match="query order"):
        run_files.merge_rankings([a, [run_files.Ranking("other", "en", ["x"], [1.0])]], 2)


def test_multi_process_flags_are_all_or_none():
    assert distributed.initialize(environ={}) is False  # nothing given, no cluster: one process
    with pytest.raises(ValueError, match="missing --num_processes, --process_id"):
        distributed.initialize("localhost:1234", None, None)
    with pytest.raises(ValueError, match="--process_id=2"):
        distributed.initialize("localhost:1234", 2, 2)
    assert distributed.initialize("localhost:1234", 1, 0) is False


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu pod"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"UMR_JAX_DISTRIBUTED": "1"}, "forced"),
    ({}, None),
])
def test_cluster_detection(environ, expected):
    assert distributed.detected_cluster(environ) == expected


# ----------------------------------------------------------------------------- a dead peer (umr_jax/distributed.py)


CHUNKS = "--config.encode.chunk_size=16"  # the tiny corpus in 6 chunks: several a process


def _launch_two(workdir, *flags, kill_process_1_at: str | None = None) -> list[subprocess.Popen]:
    """Both processes of the tiny run on localhost, their stderr in <workdir>.err<i> (no pipe to fill)."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        env.pop("UMR_JAX_KILL_AT", None)
        if i == 1 and kill_process_1_at:
            env["UMR_JAX_KILL_AT"] = kill_process_1_at  # process 1 SIGKILLs itself there; process 0 lives on
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "umr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", *flags],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{workdir}.err{i}", "w")))  # noqa: SIM115
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """When each process ended (time.monotonic())."""
    ended, deadline = [None] * len(procs), time.monotonic() + timeout
    while None in ended:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic()
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"still running after {timeout} s: {[p.returncode for p in procs]}")
        time.sleep(0.05)
    return ended


def test_a_dead_process_stops_the_other_in_time_and_the_rerun_reaches_the_single_process_result(tiny_run, tmp_path):
    workdir, timeout = tmp_path / "run", 10
    procs = _launch_two(workdir, f"--config.reliability.peer_timeout_seconds={timeout}", CHUNKS,
                        kill_process_1_at="encode.chunk_committed")
    died, stopped = _wait_all(procs, 300)
    err = pathlib.Path(f"{workdir}.err0").read_text()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == distributed.EXIT_STATUS, err[-3000:]
    # Within the timeout plus a heartbeat interval, a check and a loaded 2-core machine's slack (JAX alone: 100 s).
    assert stopped - died < timeout + 12, stopped - died
    line = [x for x in err.splitlines() if x.startswith("umr_jax.main: error:")]
    assert len(line) == 1 and "process 1 of 2 stopped responding (no heartbeat for 1" in line[0], err[-3000:]
    assert "while process 0 waited at 'round-0/encode'" in line[0] and "re-run the same command" in line[0]
    # Process 0 did not record the stage process 1 died in: the same command redoes it and finishes.
    manifest = workdir / "manifest.json"
    assert not manifest.exists() or "round-0/encode" not in json.loads(manifest.read_text())["stages"]
    procs = _launch_two(workdir, f"--config.reliability.peer_timeout_seconds={timeout}", CHUNKS)
    _wait_all(procs, 900)
    for i, p in enumerate(procs):
        assert p.returncode == 0, pathlib.Path(f"{workdir}.err{i}").read_text()[-3000:]
    # Process 1 had committed its first chunk before it died: the re-run resumed after it.
    assert re.search(r"round-0/embeddings: [1-6] chunks already encoded, resuming",
                     pathlib.Path(f"{workdir}.err1").read_text())
    # The re-run is a whole 2-process run (round-0/encode redone on, the rest from nothing): the multi-host
    # test of the suite (one 2-process run to the end is all the 2-core CI can afford).
    _assert_two_process_run_equals_the_single_process_run(workdir, tiny_run)


PEERS = """
import sys, time
import jax, jax.numpy as jnp
from umr_jax import distributed
me = int(sys.argv[2])
distributed.initialize(sys.argv[1], 2, me, peer_timeout_seconds=2)
distributed.barrier("start")
if me == 1:  # slow but alive: busy for 3x the peer timeout, computing and in Python
    x, t = jnp.ones((256, 256)), time.monotonic()
    while time.monotonic() - t < 6:
        x = (x @ x / 256).block_until_ready()
distributed.barrier("slow")
print("passed slow", flush=True)
if me == 1:
    raise SystemExit("process 1: an error")
t = time.monotonic()
try:
    distributed.barrier("round-0/index")
except distributed.PeerLostError as e:
    print(f"after {time.monotonic() - t:.1f} s: {e}", flush=True)
    raise SystemExit(f"peers: error: {e}")
"""


def test_a_slow_peer_is_waited_for_and_one_that_exits_ends_the_barrier_at_once():
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PEERS, address, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in procs]
    assert "passed slow" in out0 and "passed slow" in out1, err0[-2000:] + err1[-2000:]
    assert procs[1].returncode == 1 and procs[0].returncode == distributed.EXIT_STATUS, err0[-2000:]
    after = [x for x in out0.splitlines() if x.startswith("after")]
    assert after and "process 1 of 2 exited (see its log) while process 0 waited at 'round-0/index'" in after[0]
    assert float(after[0].split()[1]) < 8  # a heartbeat interval (0.5 s here) and a slice, not a timeout
    assert "Terminating process" not in err0 + err1  # both left through JAX's shutdown, not its abort


class _Store:
    """The coordination service's key-value store on a fake clock: a blocking get that times out advances it."""

    def __init__(self, on_tick):
        self.now, self.data, self.on_tick = 0.0, {}, on_tick

    def key_value_set(self, key, value, allow_overwrite=False):
        assert allow_overwrite or key not in self.data, key
        self.data[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    def key_value_try_get(self, key):
        if key not in self.data:
            raise RuntimeError(f"NOT_FOUND: {key}")
        return self.data[key]

    def blocking_key_value_get(self, key, timeout_ms):
        while key not in self.data:
            if timeout_ms <= 0:
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            self.now += 0.5
            timeout_ms -= 500
            self.on_tick(self)
        return self.data[key]


def _monitor(peer) -> tuple[distributed.PeerMonitor, _Store]:
    """Process 0 of 2 (timeout 20 s); `peer(store)` plays process 1 at every tick, the beat thread beats."""
    holder = {}

    def tick(store):
        peer(store)
        if store.now % holder["m"].interval < 0.5:
            holder["m"].beat()

    store = _Store(tick)
    holder["m"] = distributed.PeerMonitor(store, 0, 2, 20, clock=lambda: store.now)
    return holder["m"], store


def test_a_barrier_waits_for_a_slow_peer_as_long_as_its_heartbeats_go_on():
    def slow(store):  # beats every 5 s; reaches the barrier after 10 minutes
        store.data["umr_jax/alive/1"] = str(int(store.now // 5))
        if store.now >= 600:
            store.data.setdefault("umr_jax/barrier/0/1", "round-0/encode")

    monitor, store = _monitor(slow)
    monitor.barrier("round-0/encode")
    assert store.now >= 600 and monitor.check() is None and monitor.after == "round-0/encode"


def test_a_barrier_stops_when_a_peer_heartbeat_stops_naming_the_barrier_and_the_process():
    def dies_at_50(store):
        if store.now < 50:
            store.data["umr_jax/alive/1"] = str(int(store.now // 5))

    monitor, store = _monitor(dies_at_50)
    store.data["umr_jax/barrier/0/1"] = "workdir"  # it passed the first barrier
    monitor.barrier("workdir")
    with pytest.raises(distributed.PeerLostError) as e:
        monitor.barrier("round-0/encode")
    assert 45 + 20 < store.now <= 50 + 20 + monitor.interval + 1
    assert str(e.value).startswith("process 1 of 2 stopped responding (no heartbeat for 2")
    assert str(e.value).endswith("s) while process 0 waited at 'round-0/encode'; the finished work is saved: "
                                 "re-run the same command on every process to resume")
    assert isinstance(e.value, OSError)  # umr_jax.main reports it in one line (umr_jax/cli.py)


def test_a_barrier_stops_at_once_when_a_peer_exits_and_checks_the_order_of_barriers():
    monitor, store = _monitor(lambda store: None)
    store.data["umr_jax/barrier/0/1"] = "workdir"
    store.data["umr_jax/exited/1"] = "1"  # passed 'workdir', then exited (an error, a preemption)
    monitor.barrier("workdir")
    with pytest.raises(distributed.PeerLostError, match=r"process 1 of 2 exited .* waited at 'round-0/encode'"):
        monitor.barrier("round-0/encode")
    assert store.now <= monitor.interval + 1  # the next heartbeat read and the end of that slice
    monitor, store = _monitor(lambda store: None)
    store.data["umr_jax/barrier/0/1"] = "round-0/index"
    with pytest.raises(RuntimeError, match="out of step: process 0 reached barrier 'round-0/encode', process 1"):
        monitor.barrier("round-0/encode")


def test_the_watch_names_the_last_barrier_outside_one_and_jax_backstop_comes_later():
    monitor, store = _monitor(lambda store: None)
    store.data["umr_jax/barrier/0/1"] = "round-1/teacher"
    monitor.barrier("round-1/teacher")
    store.now += 21
    assert "while process 0 was working after 'round-1/teacher'" in str(monitor.check())
    for timeout in (2, 10, 120):
        assert distributed.backstop_seconds(timeout) > timeout + min(10, timeout / 6) + 10
    with pytest.raises(ValueError, match=r"reliability\.peer_timeout_seconds=0"):
        distributed.initialize(environ={}, peer_timeout_seconds=0)
