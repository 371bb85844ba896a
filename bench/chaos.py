"""Chaos soak: runs of configs/tiny.py killed at random moments, resumed, and compared with an uninterrupted run.

    python bench/chaos.py --runs=30 [--seed=0] [--max_kills=3] [--workdir=/tmp/umr-chaos]

Each run is started as a user starts it (`python -m umr_jax.main`) and, one or
more times (the number, the moments and the signals are drawn from the seed),
sent SIGKILL (a dead machine: nothing runs) or SIGTERM (a preemption notice: the
run stops at the next safe boundary with exit status 75) at a random moment
within the work it has left (start-up plus the stages not yet recorded, timed
on an uninterrupted run); the first kill always lands. Then the same command
runs it to the end. A run counts as identical when every round's metrics.json,
the summary's dev metrics and every exported file equal the uninterrupted
run's bit for bit. Last line: `chaos_identical_runs: K/N`.
"""

from __future__ import annotations

import contextlib
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
    """`python -m umr_jax.main` on the workdir; its log is appended to `<workdir>.log` (a pipe could fill up)."""
    with open(f"{workdir}.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "umr_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
             f"--config.compilation_cache_dir={cache}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                 "TOKENIZERS_PARALLELISM": "false"})


def tail(workdir: pathlib.Path) -> str:
    return pathlib.Path(f"{workdir}.log").read_text(errors="replace")[-1500:]


STEPS = ("encode", "index", "retrieve", "evaluate", "rerank", "teacher", "train")


def run_order(stage: str) -> tuple[float, int]:
    """A stage's place in a run: round r's encode ... evaluate, then round r + 1's teacher and train; export last."""
    if "/" not in stage:
        return (float("inf"), 0)
    r, step = stage.split("/")
    r = int(r.removeprefix("round-"))
    return (r - 1 if step in ("teacher", "train") else r, STEPS.index(step))


def stages(workdir: pathlib.Path) -> dict[str, float]:
    """Recorded stages and their seconds, in run order ({} before the first, or while the manifest is replaced)."""
    try:
        recorded = json.loads((workdir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k: recorded[k]["seconds"] for k in sorted(recorded, key=run_order)}


class Schedule:
    """Where the work of a run lies in time: start-up, then the reference run's stages in order.

    A kill is drawn uniformly over what is left of a run (start-up plus the
    stages not yet recorded), so every kill lands while there is work to lose.
    """

    def __init__(self, duration: float, reference: dict[str, float]):
        self.reference = reference
        self.startup = max(1.0, duration - sum(reference.values()))

    def remaining(self, workdir: pathlib.Path) -> float:
        done = stages(workdir)
        return self.startup + sum(s for k, s in self.reference.items() if k not in done)


def outcome(workdir: pathlib.Path) -> dict[str, bytes]:
    """The files a run must reproduce: per-round metrics, the summary's dev metrics, the exported towers."""
    files = {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.glob("round-*/metrics.json"))}
    files["metrics.json:dev"] = json.dumps(json.loads((workdir / "metrics.json").read_text())["dev"],
                                           sort_keys=True).encode()
    for p in sorted((workdir / "export").rglob("*")):
        if p.is_file():
            files[str(p.relative_to(workdir))] = p.read_bytes()
    return files


def run_to_end(workdir: pathlib.Path, cache: pathlib.Path) -> int:
    return start(workdir, cache).wait()


def interrupted_run(workdir: pathlib.Path, cache: pathlib.Path, rng: np.random.Generator, schedule: Schedule,
                    max_kills: int, grace: float) -> tuple[list[str], str | None]:
    """Kills a run 1..max_kills times at random moments, then resumes it to the end; returns the log and an error.

    The first kill always lands (a run that finishes first is started again from nothing); a later one
    drawn past the end of the resumed run's work finds it finished and counts for nothing.
    """
    log: list[str] = []
    kills = int(rng.integers(1, max_kills + 1))
    while len(log) < kills:
        sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
        delay = float(rng.uniform(0.0, 0.9 * schedule.remaining(workdir)))
        proc = start(workdir, cache)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=delay)
        if proc.returncode is not None:  # finished before the kill
            if proc.returncode != 0:
                return log, f"exit status {proc.returncode} before any kill: {tail(workdir)}"
            if not log:
                shutil.rmtree(workdir)  # the first kill must land: start again
                continue
            break
        doing = next((k for k in schedule.reference if k not in stages(workdir)), "the end")
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return log, f"{sig.name} at {delay:.1f}s: no exit within {grace:.0f}s"
        expected = {-signal.SIGKILL} if sig == signal.SIGKILL else {75, -signal.SIGTERM, 0}
        if proc.returncode not in expected:
            return log, f"{sig.name} at {delay:.1f}s: exit status {proc.returncode}: {tail(workdir)}"
        log.append(f"{sig.name} at {delay:.1f}s during {doing} -> {proc.returncode}")
        if proc.returncode == 0:
            break
    if run_to_end(workdir, cache) != 0:
        return log, f"resume failed: {tail(workdir)}"
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
        code = run_to_end(reference, cache)
        duration = time.perf_counter() - began
        if code != 0:
            sys.exit(f"the uninterrupted run failed (exit status {code}): {tail(reference)}")
        expected = outcome(reference)
        schedule = Schedule(duration, stages(reference))
        print(f"uninterrupted run: {duration:.1f}s ({schedule.startup:.1f}s start-up, {len(schedule.reference)} "
              f"stages), {len(expected)} files to reproduce", flush=True)
        identical, kills = 0, {"SIGKILL": 0, "SIGTERM": 0}
        for i in range(FLAGS.runs):
            workdir = root / f"run-{i:03d}"
            shutil.rmtree(workdir, ignore_errors=True)
            pathlib.Path(f"{workdir}.log").unlink(missing_ok=True)
            rng = np.random.default_rng([FLAGS.seed, i])
            log, error = interrupted_run(workdir, cache, rng, schedule, FLAGS.max_kills, FLAGS.grace_seconds)
            for entry in log:
                for name in kills:
                    kills[name] += entry.startswith(name)
            if error is None:
                got = outcome(workdir)
                differing = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
                error = f"differs from the uninterrupted run: {differing[:6]}" if differing else None
            identical += error is None
            print(f"run {i}: {'; '.join(log)}; {'identical' if error is None else 'FAILED: ' + error}", flush=True)
        print(f"kills delivered: {kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM (every run at least one)")
        print(f"chaos_identical_runs: {identical}/{FLAGS.runs}")
    finally:
        if FLAGS.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
