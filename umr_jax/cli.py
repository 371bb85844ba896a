"""What every absl binary of umr_jax shares: user errors end the program with one clear line.

Two places can meet a user's mistake: absl's flag parsing (a mistyped
``--config.key=value``, a value of the wrong type, a config file that does not
load), which runs before ``main``, and ``main`` itself (bad input files, missing
models, impossible meshes). Both end with ``program: error: ...`` on one line and
exit status 1; ``--verbosity=1`` (or ``-v 1``) shows the traceback of the second kind.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

# Bad input (InputError, CheckpointError and other ValueErrors name the file,
# line or key), missing files and full or read-only disks (OSError), numeric
# faults (FloatingPointError names the step).
USER_ERRORS = (ValueError, OSError, FloatingPointError)

# ml_collections' message for an unknown key: "'trian'\nDid you mean "train" instead of "trian"?"
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


def reports_user_errors(program: str) -> Callable:
    """Decorates an absl `main(argv)`: a user error exits with status 1 and its message, no traceback."""
    def decorate(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str]) -> None:
            try:
                main(argv)
            except USER_ERRORS as e:
                logging.debug("traceback of the error below", exc_info=True)
                sys.exit(f"{program}: error: {one_line(e)} (the traceback: --verbosity=1)")
        return wrapped
    return decorate


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
    """One line for a flag that absl or ml_collections refused; an unknown key names its flag and the suggestion."""
    text = str(error.args[0]) if isinstance(error, KeyError | AttributeError) and error.args else str(error)
    hint = _DID_YOU_MEAN.search(text)
    if hint is None and not isinstance(error, KeyError | AttributeError):
        return one_line(text)
    key = hint.group(2) if hint else text.splitlines()[0].strip("'\"")
    flag = next((a.split("=", 1)[0] for a in argv[1:]
                 if a.startswith("--") and key in a.split("=", 1)[0].split(".")[1:]), "")
    message = f"{flag}: unknown config key {key!r}" if flag else f"unknown config key {key!r}"
    return message + (f"; did you mean {hint.group(1)!r}?" if hint else "")


FLAG_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError)


def exit_on_flag_error(program: str, error: Exception, argv: Sequence[str]) -> None:
    logging.debug("traceback of the flag error below", exc_info=True)
    sys.stderr.write(f"{program}: error: {flag_error_message(error, argv)}\n")
    sys.exit(1)


def parse_flags(program: str) -> Callable[[list[str]], list[str]]:
    """An absl `flags_parser` that turns every flag-parsing failure into one line and exit status 1."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except FLAG_ERRORS as e:
            exit_on_flag_error(program, e, argv)
            raise  # unreachable: exit_on_flag_error exits
    return parse


def run(program: str, main: Callable[[Sequence[str]], None], define_flags: Callable[[], None] | None = None) -> None:
    """`define_flags(); app.run(main)` with one-line errors for bad flags as well as for bad input.

    ml_collections reads ``--config.a.b`` overrides from sys.argv while the
    config flag is *defined*, so a mistyped key fails in `define_flags`, before
    absl parses anything: both places are covered.
    """
    if define_flags is not None:
        try:
            define_flags()
        except FLAG_ERRORS as e:
            exit_on_flag_error(program, e, sys.argv)
    app.run(main, flags_parser=parse_flags(program))
