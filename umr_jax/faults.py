"""Named points where a test can kill or signal the process, to prove that every stage survives it.

`UMR_JAX_KILL_AT=<point>` makes the process SIGKILL itself the first time it
reaches that point: no exception handler, `finally` or atexit runs, exactly as
when a machine dies. `<point>@<n>` fires the n-th time instead, and
`UMR_JAX_KILL_SIGNAL=SIGTERM` (or any signal name) sends that signal instead
of SIGKILL: a preemption notice arriving at a known moment. Unset (always,
outside tests), a point is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "UMR_JAX_KILL_AT"
SIGNAL_ENV = "UMR_JAX_KILL_SIGNAL"
POINTS = (
    "encode.chunk_encoded",  # a corpus chunk is encoded, not yet written
    "encode.chunk_committed",  # a corpus chunk is on disk, more remain
    "index.built",  # the index exists in memory, not yet saved
    "retrieve.dev_written",  # dev run file written, training run not yet
    "teacher.chunk_scored",  # one chunk of pairs is scored, not yet written
    "teacher.chunk_committed",  # one chunk of teacher scores on disk, more remain
    "train.step_started",  # a training step is being computed
    "train.checkpoint_saved",  # mid-epoch, right after an Orbax checkpoint
    "evaluate.metrics_written",  # metrics.json written, the stage not yet recorded
    "export.query_written",  # the query tower exported, the passage tower not yet
    "read.chunk_committed",  # one chunk of reader answers on disk, more remain
)

_reached: dict[str, int] = {}


def point(name: str) -> None:
    armed = os.environ.get(ENV)
    if not armed or armed.split("@")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == (int(armed.split("@")[1]) if "@" in armed else 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_ENV, "SIGKILL")))
