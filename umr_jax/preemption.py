"""Preemption notices: a signal asks the run to stop at the next safe boundary, with nothing lost.

Spot / preemptible Cloud TPU VMs and SLURM send SIGTERM (SLURM can send a
chosen signal, e.g. `--signal=USR1@120`, before the time limit) and give a
grace period. A notice only sets a flag; the run then stops where stopping
costs nothing:

  training  after the step that is running: a checkpoint of that step is saved
            (every process of a multi-process run agrees on the step first)
  encoding  after the chunk that is being encoded is committed
  teacher   after the chunk of pairs that is being scored is committed
  other     after the stage that is running is recorded

and exits with status `EXIT_STATUS` and one log line saying where it stopped.
The same command resumes exactly there: no step, chunk or stage is redone. A
second notice before that point ends the process at once (the grace period
is the user's to cut short).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

import numpy as np

EXIT_STATUS = 75  # EX_TEMPFAIL: a temporary failure, run the same command again

_state: dict = {"signal": None, "installed": ()}


class Preempted(Exception):  # noqa: N818 -- not an error: the run was asked to stop
    """Raised at a safe boundary after a notice; `umr_jax.main` exits with EXIT_STATUS."""


def install(signals: Sequence[str]) -> None:
    """Takes the named signals (e.g. ('SIGTERM', 'SIGUSR1')) as preemption notices in this process."""
    numbers = []
    for name in signals:
        number = getattr(signal, str(name).upper(), None)
        if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"reliability.preemption_signals: {name!r} is not a signal that can be caught "
                             "(e.g. SIGTERM, SIGUSR1)")
        numbers.append(number)
    for number in numbers:
        signal.signal(number, _on_notice)
    _state["installed"] = tuple(numbers)
    _state["signal"] = None


def uninstall() -> None:
    for number in _state["installed"]:
        signal.signal(number, signal.SIG_DFL)
    _state["installed"] = ()


def _on_notice(signum: int, frame) -> None:
    if _state["signal"] is not None:  # a second notice: stop now, as if nothing had been caught
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state["signal"] = signal.Signals(signum).name


def requested() -> str | None:
    """The name of the signal that brought the notice to this process, if one did."""
    return _state["signal"]


def agreed() -> bool:
    """Whether any process got a notice; every process must call this at the same point (a collective).

    The multi-process equivalent of `multihost_utils.reached_preemption_sync_point`:
    all processes learn of a notice at the same step, so they save the same
    checkpoint. One process: no collective.
    """
    import jax

    local = requested() is not None
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
    return bool(np.asarray(flags).any())


def stop_if_agreed(where: str) -> None:
    """Raises Preempted if any process got a notice; every process must call it at the same point."""
    if agreed():
        raise Preempted(f"{requested() or 'a notice to another process'} received: stopped {where}")


def stop_if_requested(where: str) -> None:
    """Raises Preempted (with `where` in its message) if this process got a notice."""
    if requested() is not None:
        raise Preempted(f"{requested()} received: stopped {where}")
