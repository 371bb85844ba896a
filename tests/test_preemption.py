"""Preemption notices: SIGTERM in encoding, teacher scoring and training stops at the next safe boundary,
exits with status 75, and the same command resumes there with nothing redone and the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import assert_same_result, recorded_stages, run_tiny
from umr_jax import faults, preemption


def _notice_at(point: str) -> dict[str, str]:
    return {faults.ENV: point, faults.SIGNAL_ENV: "SIGTERM"}


def _preempted(done: subprocess.CompletedProcess, where: str) -> None:
    assert done.returncode == preemption.EXIT_STATUS, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "preempted" in line]
    assert len(lines) == 1 and "SIGTERM received: stopped " + where in lines[0], lines
    assert "run the same command to resume" in lines[0] and "Traceback" not in done.stderr


def test_sigterm_in_each_chunked_stage_stops_at_the_boundary_and_resumes_with_nothing_redone(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    embeddings, teacher = workdir / "round-0" / "embeddings", workdir / "round-1" / "teacher"

    # Encoding: the notice arrives while chunk 1 is being encoded; it is committed, chunk 2 is not started.
    done = run_tiny(workdir, env=_notice_at("encode.chunk_encoded@2"))
    _preempted(done, "after committing corpus chunk 1")
    assert sorted(p.name for p in embeddings.glob("chunk-*.json")) == ["chunk-000000.json", "chunk-000001.json"]
    assert "round-0/encode" not in recorded_stages(workdir)
    committed = {p.name: p.stat().st_mtime_ns for p in embeddings.glob("chunk-*")}

    # Teacher: the notice arrives while the first chunk of pairs is scored; it is committed, the next is not.
    done = run_tiny(workdir, env=_notice_at("teacher.chunk_scored@1"))
    _preempted(done, "after committing")
    assert sorted(p.name for p in teacher.glob("chunk-*.npy")) == ["chunk-000000.npy"]
    assert {p.name: p.stat().st_mtime_ns for p in embeddings.glob("chunk-*") if p.name in committed} == committed
    assert "round-0/encode" in recorded_stages(workdir) and "round-1/teacher" not in recorded_stages(workdir)
    scored = (teacher / "chunk-000000.npy").stat().st_mtime_ns

    # Training: the notice arrives during step 3 of 4 (index 2); that step ends, is checkpointed, the run stops.
    done = run_tiny(workdir, env=_notice_at("train.step_started@3"))
    _preempted(done, "after step 3 of 4")
    assert (teacher / "chunk-000000.npy").stat().st_mtime_ns == scored
    assert "round-1/teacher" in recorded_stages(workdir) and "round-1/train" not in recorded_stages(workdir)
    assert (workdir / "round-1" / "checkpoints" / "3").is_dir()  # not a checkpoint_every (2) step

    done = run_tiny(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert recorded_stages(workdir)["round-1/train"]["info"]["resumed_at"] == 3  # zero steps redone
    assert_same_result(workdir, tiny_run)


def test_a_notice_between_stages_stops_after_the_running_stage(tmp_path):
    workdir = tmp_path / "run"
    done = run_tiny(workdir, "--config.rounds=0", "--config.export=false", env=_notice_at("index.built"))
    _preempted(done, "after stage round-0/index")
    assert list(recorded_stages(workdir)) == ["round-0/encode", "round-0/index"]


def test_signal_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="'SIGKILL' is not a signal that can be caught"):
        preemption.install(["SIGKILL"])
    with pytest.raises(ValueError, match="'SIGNOPE'"):
        preemption.install(["SIGNOPE"])
    done = run_tiny(tmp_path / "run", "--config.reliability.preemption_signals=('SIGBOGUS',)")
    assert done.returncode == 1 and "reliability.preemption_signals: 'SIGBOGUS'" in done.stderr


def test_a_second_notice_ends_the_process_at_once():
    code = ("import os, signal, time\n"
            "from umr_jax import preemption\n"
            "preemption.install(['SIGUSR1'])\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "assert preemption.requested() == 'SIGUSR1'\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(5)\n"
            "print('still alive')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == -signal.SIGUSR1 and "still alive" not in done.stdout, done.stderr


AGREE = """
import os, signal, sys
import jax
from umr_jax import distributed, preemption
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
preemption.install(["SIGUSR1"])
for step in range(1, 50):
    if int(sys.argv[2]) == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)  # the notice reaches process 1 only, during step 3
    if preemption.agreed():
        print(f"stopped after step {step}; own notice: {preemption.requested()}", flush=True)
        break
jax.distributed.shutdown()
"""


def test_processes_agree_on_the_step_where_a_notice_to_one_of_them_stops_both(tmp_path):
    from test_multihost import _free_port

    address = f"localhost:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, address, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    stops = [[line for line in out.splitlines() if line.startswith("stopped")] for out, _ in outputs]  # not gloo's
    assert stops == [["stopped after step 3; own notice: None"], ["stopped after step 3; own notice: SIGUSR1"]]
