"""Multi-host: two JAX processes on localhost (gloo collectives) run the tiny config like one process does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import ROOT
from umr_jax import distributed, run_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_reach_the_single_process_result(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # 2 x 4 = the 8 of tiny_run
    procs = [subprocess.Popen([sys.executable, "-m", "umr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}",
                               f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                               "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Each process did its share: its own embedding chunks, index shard and rankings; the pair chunks split.
    embeddings = workdir / "round-0" / "embeddings"
    assert (embeddings / "done-0-of-2.json").exists() and (embeddings / "done-1-of-2.json").exists()
    assert (workdir / "round-0" / "index" / "shard-1-of-2" / "index.json").exists()
    parts = [run_files.read_jsonl(str(workdir / "round-0" / "shards" / f"run-dev-{p}-of-2.jsonl")) for p in (0, 1)]
    assert not set(parts[0][0].passage_ids) & set(parts[1][0].passage_ids)
    # The merged global top-k equals the single-process search, and so do the metrics of every round.
    for r in range(3):
        ours = run_files.read_jsonl(str(workdir / f"round-{r}" / "run-dev.jsonl"))
        reference = run_files.read_jsonl(str(tiny_run / f"round-{r}" / "run-dev.jsonl"))
        assert [x.passage_ids for x in ours] == [x.passage_ids for x in reference], f"round {r}"
        np.testing.assert_allclose([x.scores for x in ours], [x.scores for x in reference], atol=1e-5)
    metrics = json.loads((workdir / "metrics.json").read_text())["dev"]
    reference = json.loads((tiny_run / "metrics.json").read_text())["dev"]
    for r, table in reference.items():
        for lang, row in table.items():
            for name, value in row.items():
                assert metrics[r][lang][name] == pytest.approx(value, abs=1e-6), (r, lang, name)
    np.testing.assert_allclose(np.load(workdir / "round-2" / "teacher" / "scores.npy"),
                               np.load(tiny_run / "round-2" / "teacher" / "scores.npy"), atol=1e-5)
    for tower in ("query", "passage"):
        ours = load_file(workdir / "export" / tower / "model.safetensors")
        reference = load_file(tiny_run / "export" / tower / "model.safetensors")
        for name, value in reference.items():
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
