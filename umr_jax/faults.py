"""Named points where a test can kill the process, to prove that every stage survives kill -9.

`UMR_JAX_KILL_AT=<point>` makes the process SIGKILL itself the first time it
reaches that point: no exception handler, `finally` or atexit runs, exactly as
when a TPU VM is preempted. Unset (always, outside tests), a point is a
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "UMR_JAX_KILL_AT"
POINTS = (
    "encode.chunk_committed",  # a corpus chunk is on disk, more remain
    "index.built",  # the index exists in memory, not yet saved
    "retrieve.dev_written",  # dev run file written, training run not yet
    "teacher.chunk_committed",  # one chunk of teacher scores on disk, more remain
    "train.checkpoint_saved",  # mid-epoch, right after an Orbax checkpoint
    "evaluate.metrics_written",  # metrics.json written, the stage not yet recorded
    "export.query_written",  # the query tower exported, the passage tower not yet
)


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
