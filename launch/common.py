"""What the launch scripts (tpu_vm.py, gpu.py) share: the command line of the binary they launch,
and printing (--dry-run) or running commands.

Why one module: both scripts must hand the binary the same flags (config, workdir, overrides) and
print commands the same way (shell-quoted, one per line), so that a dry run can be pasted into a
shell. The scripts import it as `common` (they are run as files: `python launch/gpu.py ...`).
"""

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_WORKDIR = (
    "Every process must see the same --workdir: a gs://BUCKET/DIR URL (the binary writes to Cloud Storage "
    "itself; needs gcsfs), or a filesystem shared by all hosts (NFS, Filestore). Re-running the run resumes "
    "from it."
)
_OVERRIDE = re.compile(r"--config\.[A-Za-z_][\w.]*=")


def override(value: str) -> str:
    """An --overrides value as the binary's flag --config.KEY=VALUE (the '--config.' may be left out)."""
    flag = value if value.startswith("--") else "--config." + value
    if not _OVERRIDE.match(flag):
        raise argparse.ArgumentTypeError(f"{value!r} is not --config.KEY=VALUE")
    return flag


def add_run_args(parser: argparse.ArgumentParser, *, workdir_required: bool) -> None:
    """The flags handed to `python -m umr_jax.main`, and --dry-run."""
    parser.add_argument("--config", default="configs/xor.py", help="config file, relative to the repo root")
    parser.add_argument("--workdir", required=workdir_required, help="the run's output directory. " + SHARED_WORKDIR)
    parser.add_argument(
        "--overrides", action="append", default=[], type=override, metavar="--config.KEY=VALUE",
        help="a config override passed to the binary, repeatable; write --overrides=--config.KEY=VALUE "
        "(with '=', as argparse takes a separate '--...' for a flag) or --overrides KEY=VALUE",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")


def is_bucket(workdir: str) -> bool:
    return workdir.startswith("gs://")


def check_workdir(parser: argparse.ArgumentParser, workdir: str) -> None:
    if "://" in workdir and not is_bucket(workdir):
        parser.error(f"--workdir {workdir!r}: the only URLs the binary writes to are gs://BUCKET/DIR; for "
                     "anything else pass a path on a filesystem every host sees")
    if is_bucket(workdir) and not workdir[len("gs://"):].split("/", 1)[0]:
        parser.error(f"--workdir {workdir!r}: expected gs://BUCKET/DIR")


def main_argv(interpreter: list[str], args: argparse.Namespace, *extra: str) -> list[str]:
    """`python -m umr_jax.main` with the run's flags; `interpreter` is the python (maybe behind `env K=V`)."""
    return [*interpreter, "-m", "umr_jax.main", f"--config={args.config}", f"--workdir={args.workdir}",
            *args.overrides, *extra]


def show(argv: list[str], cwd: str | Path | None = None) -> str:
    """A command as one shell line (`cd CWD && ...` when it must run in CWD)."""
    line = shlex.join(argv)
    return f"cd {shlex.quote(str(cwd))} && {line}" if cwd else line


def require(executable: str) -> None:
    """Exit with a clear message when `executable` is not on PATH (before anything has run)."""
    if shutil.which(executable) is None:
        sys.exit(f"error: {executable!r} not found on PATH; install it, or use --dry-run to print the commands")


def run(argv: list[str]) -> None:
    """Run one command, echoed to stderr; exit on failure."""
    print("+", show(argv), file=sys.stderr, flush=True)
    code = subprocess.run(argv).returncode
    if code:
        sys.exit(f"error: exit status {code}: {show(argv)}")
