"""What every absl binary of umr_jax shares: user errors end the program with one clear line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from absl import logging

# Bad input (InputError, CheckpointError and other ValueErrors name the file,
# line or key), missing files and full or read-only disks (OSError), numeric
# faults (FloatingPointError names the step).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def reports_user_errors(program: str) -> Callable:
    """Decorates an absl `main(argv)`: a user error exits with status 1 and its message, no traceback."""
    def decorate(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str]) -> None:
            try:
                main(argv)
            except USER_ERRORS as e:
                logging.debug("traceback of the error below", exc_info=True)
                sys.exit(f"{program}: error: {e}\n(the traceback: --verbosity=1)")
        return wrapped
    return decorate
