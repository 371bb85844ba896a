"""Chaos soak: runs of configs/tiny.py killed at random moments, resumed, and compared with an uninterrupted run.

    python bench/chaos.py --runs=30 [--seed=0] [--max_kills=3] [--workdir=/tmp/umr-chaos]

Each run is started as a user starts it (`python -m umr_jax.main`) and, one or
more times (the number, the moments and the signals are drawn from the seed),
sent SIGKILL (a dead machine: nothing runs) or SIGTERM (a preemption notice: the
run stops at the next safe boundary with exit status 75) at a random moment
between its start and the uninterrupted run's duration; then the same command
runs it to the end. A run counts as identical when every round's metrics.json,
the summary's dev metrics and every exported file equal the uninterrupted
run's bit for bit. Last line: `chaos_identical_runs: K/N`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.py"

flags.DEFINE_integer("runs", 30, "number of interrupted runs")
flags.DEFINE_integer("seed", 0, "draws the kills of every run")
flags.DEFINE_integer("max_kills", 3, "each run is interrupted 1..max_kills times")
flags.DEFINE_string("workdir", None, "where the runs go (kept); default: a temporary directory, removed")
flags.DEFINE_float("grace_seconds", 300.0, "a notified run must exit within this long (else: a hang, a failure)")
FLAGS = flags.FLAGS


def start(workdir: pathlib.Path, cache: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "umr_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
         f"--config.compilation_cache_dir={cache}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TOKENIZERS_PARALLELISM": "false"})


def first_unfinished_stage(workdir: pathlib.Path) -> str:
    try:
        stages = json.loads((workdir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError):
        return "(before any stage)"
    return f"after {list(stages)[-1]}" if stages else "(before any stage)"


def outcome(workdir: pathlib.Path) -> dict[str, bytes]:
    """The files a run must reproduce: per-round metrics, the summary's dev metrics, the exported towers."""
    files = {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.glob("round-*/metrics.json"))}
    files["metrics.json:dev"] = json.dumps(json.loads((workdir / "metrics.json").read_text())["dev"],
                                           sort_keys=True).encode()
    for p in sorted((workdir / "export").rglob("*")):
        if p.is_file():
            files[str(p.relative_to(workdir))] = p.read_bytes()
    return files


def run_to_end(workdir: pathlib.Path, cache: pathlib.Path) -> tuple[int, str]:
    proc = start(workdir, cache)
    _, err = proc.communicate()
    return proc.returncode, err


def interrupted_run(workdir: pathlib.Path, cache: pathlib.Path, rng: np.random.Generator, duration: float,
                    max_kills: int, grace: float) -> tuple[list[str], str | None]:
    """Kills a run 1..max_kills times at random moments, then resumes it to the end; returns the log and an error."""
    log = []
    for _ in range(int(rng.integers(1, max_kills + 1))):
        sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
        delay = float(rng.uniform(0.0, duration))
        proc = start(workdir, cache)
        try:
            proc.wait(timeout=delay)
            log.append(f"finished before the {sig.name} at {delay:.1f}s")
            break
        except subprocess.TimeoutExpired:
            pass
        where = first_unfinished_stage(workdir)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return log, f"{sig.name} at {delay:.1f}s: no exit within {grace:.0f}s"
        expected = {-signal.SIGKILL} if sig == signal.SIGKILL else {75, -signal.SIGTERM, 0}
        if proc.returncode not in expected:
            return log, f"{sig.name} at {delay:.1f}s: exit status {proc.returncode}: {err[-1500:]}"
        log.append(f"{sig.name} at {delay:.1f}s {where} -> {proc.returncode}")
        if proc.returncode == 0:
            break
    code, err = run_to_end(workdir, cache)
    if code != 0:
        return log, f"resume: exit status {code}: {err[-1500:]}"
    return log, None


def main(argv) -> None:
    del argv
    root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="umr-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "xla-cache"
    try:
        reference = root / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        run_to_end(root / "warm-up", cache)  # fills the compilation cache: the timed run is what resumes see
        began = time.perf_counter()
        code, err = run_to_end(reference, cache)
        duration = time.perf_counter() - began
        if code != 0:
            sys.exit(f"the uninterrupted run failed (exit status {code}): {err[-3000:]}")
        expected = outcome(reference)
        print(f"uninterrupted run: {duration:.1f}s, {len(expected)} files to reproduce", flush=True)
        identical, kills = 0, {"SIGKILL": 0, "SIGTERM": 0}
        for i in range(FLAGS.runs):
            workdir = root / f"run-{i:03d}"
            shutil.rmtree(workdir, ignore_errors=True)
            rng = np.random.default_rng([FLAGS.seed, i])
            log, error = interrupted_run(workdir, cache, rng, duration, FLAGS.max_kills, FLAGS.grace_seconds)
            for entry in log:
                for name in kills:
                    kills[name] += entry.startswith(name)
            if error is None:
                got = outcome(workdir)
                differing = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
                error = f"differs from the uninterrupted run: {differing[:6]}" if differing else None
            identical += error is None
            print(f"run {i}: {'; '.join(log)}; {'identical' if error is None else 'FAILED: ' + error}", flush=True)
        print(f"kills delivered: {kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM")
        print(f"chaos_identical_runs: {identical}/{FLAGS.runs}")
    finally:
        if FLAGS.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
