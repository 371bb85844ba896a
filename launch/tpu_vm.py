#!/usr/bin/env python3
"""Run umr_jax on a Cloud TPU VM: one host (v4-8) or a pod slice of several (v4-32, v5litepod-16).

Why a script: a pod slice is several VMs ("workers") that all need the same code and environment
and must start the same program together. It strings together gcloud commands; --dry-run prints
them, shell-quoted, one per line. On Cloud TPU, jax.distributed.initialize() finds the other
workers by itself, so the binary gets no coordinator flags.

Steps (--steps, always in this order):
  create  the TPU VM (gcloud compute tpus tpu-vm create), or with --queued a queued resource
          (gcloud compute tpus queued-resources create --node-id), waited for until ACTIVE
  setup   on every worker: clone --repo at --branch into ~/umr_jax (or update the clone), a
          Python 3.11 venv ~/umr_jax/.venv (made by uv), requirements.txt, jax[tpu] of the pinned version
          and gcsfs (pyproject.toml's `gcs` extra: a gs:// workdir)
  run     on every worker: --mount, then `python -m umr_jax.main` under nohup (ssh may disconnect),
          appending to ~/umr_jax.log; re-running this step resumes the run from the workdir
  delete  the TPU VM (with --queued: the queued resource and its VM)

The workdir must be one every worker sees: a bucket URL, gs://BUCKET/DIR (the binary writes to Cloud
Storage itself, with the VM's service account), or a path on NFS or Filestore (mounted by --mount).

    python launch/tpu_vm.py --name=umr --zone=us-central2-b --accelerator_type=v4-32 \\
        --repo=https://github.com/ORG/umr_jax.git --workdir=gs://BUCKET/umr/xor --dry-run
"""

import argparse
import re
import sys

import common

STEPS = ("create", "setup", "run", "delete")
# Runtime images by accelerator family (Cloud TPU docs); all are Ubuntu 22.04 with Python 3.10,
# hence the uv-made Python 3.11 venv.
RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"  # v2, v3, v4
CLONE = "umr_jax"  # in the home directory of every worker
LOG = "~/umr_jax.log"
POLL_SECONDS = 30


def jax_version() -> str:
    """The jax pin of requirements.txt: jax[tpu] must be the same version."""
    found = re.search(r"^jax==(\S+)", (common.REPO / "requirements.txt").read_text(), re.MULTILINE)
    if not found:
        sys.exit("error: no jax==VERSION line in requirements.txt")
    return found.group(1)


def gcs_extra() -> list[str]:
    """pyproject.toml's `gcs` extra (gcsfs, pinned): what a gs:// workdir needs."""
    import tomllib
    with open(common.REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["gcs"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM name (also the queued resource's id)")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    parser.add_argument("--accelerator_type", default="v4-32", help="e.g. v4-8, v4-32, v5litepod-16")
    parser.add_argument("--runtime_version", help=f"TPU software image (default: {DEFAULT_RUNTIME}, or for "
                        f"v5e/v5p/v6e {', '.join(RUNTIMES.values())})")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    parser.add_argument("--repo", help="git URL of umr_jax to clone on the workers (needed by setup)")
    parser.add_argument("--branch", default="main", help="git branch or tag to check out")
    parser.add_argument("--mount", help="shell command run on every worker before the job, e.g. an NFS mount "
                        "of the workdir or of the data; make it idempotent (`mountpoint -q DIR || ...`)")
    parser.add_argument("--steps", default="create,setup,run", help=f"comma-separated subset of {','.join(STEPS)}")
    common.add_run_args(parser, workdir_required=False)
    args = parser.parse_args(argv)

    args.steps = set(args.steps.split(","))
    if unknown := args.steps - set(STEPS):
        parser.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}; choose from {','.join(STEPS)}")
    if "setup" in args.steps and not args.repo:
        parser.error("the setup step needs --repo (a git URL)")
    if "run" in args.steps:
        if not args.workdir:
            parser.error("the run step needs --workdir (a path shared by all workers)")
        common.check_workdir(parser, args.workdir)
        if not args.workdir.startswith("/") and not common.is_bucket(args.workdir):
            parser.error(f"--workdir {args.workdir!r} must be gs://BUCKET/DIR or an absolute path (on the workers' "
                         "shared filesystem)")
    if not args.runtime_version:
        family = args.accelerator_type.rsplit("-", 1)[0]
        args.runtime_version = RUNTIMES.get(family, DEFAULT_RUNTIME)
    return args


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    """`gcloud compute tpus WORDS` in the run's zone and project."""
    return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}",
            *([f"--project={args.project}"] if args.project else [])]


def ssh(args: argparse.Namespace, remote: str, worker: str = "all") -> list[str]:
    return [*gcloud(args, "tpu-vm", "ssh", args.name), f"--worker={worker}", f"--command={remote}"]


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The commands of the chosen steps."""
    spot = ["--spot"] if args.spot else []
    out = []
    if "create" in args.steps:
        if args.queued:
            out.append([*gcloud(args, "queued-resources", "create", args.name), f"--node-id={args.name}",
                        f"--accelerator-type={args.accelerator_type}", f"--runtime-version={args.runtime_version}",
                        *spot])
        else:
            out.append([*gcloud(args, "tpu-vm", "create", args.name), f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.runtime_version}", *spot])
    if args.queued and args.steps & {"setup", "run"}:  # ssh works once the queued resource is ACTIVE
        state = common.show([*gcloud(args, "queued-resources", "describe", args.name), "--format=value(state.state)"])
        out.append(["bash", "-c", f"while :; do s=$({state}) || exit 1; case $s in ACTIVE) break;; "
                    f'FAILED|SUSPENDED) echo "queued resource: $s" >&2; exit 1;; esac; '
                    f'echo "queued resource: $s, waiting" >&2; sleep {POLL_SECONDS}; done'])
    if "setup" in args.steps:
        clone = common.show(["git", "clone", "--branch", args.branch, args.repo, CLONE])
        update = common.show(["git", "-C", CLONE, "fetch", "origin", args.branch]) + " && " + common.show(
            ["git", "-C", CLONE, "checkout", "-B", args.branch, "FETCH_HEAD"])
        venv = ".venv/bin/python"
        out.append(ssh(args, "; ".join([
            "set -e",
            f"if [ -d {CLONE}/.git ]; then {update}; else {clone}; fi",
            "python3 -m pip install --user --quiet uv",
            f"cd {CLONE}",
            f"test -x {venv} || python3 -m uv venv --python 3.11 .venv",
            common.show(["python3", "-m", "uv", "pip", "install", "--python", venv, "-r", "requirements.txt",
                         f"jax[tpu]=={jax_version()}", *gcs_extra()]),
        ])))
    if "run" in args.steps:
        job = common.show(common.main_argv([".venv/bin/python"], args))
        out.append(ssh(args, "; ".join([
            "set -e",
            *([args.mount] if args.mount else []),
            f"cd {CLONE}",
            f'nohup {job} >> {LOG} 2>&1 < /dev/null & echo "$(hostname): started, log in {LOG}"',
        ])))
    if "delete" in args.steps:
        if args.queued:
            out.append([*gcloud(args, "queued-resources", "delete", args.name), "--force", "--quiet"])
        else:
            out.append([*gcloud(args, "tpu-vm", "delete", args.name), "--quiet"])
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cmds = commands(args)
    if not args.dry_run:
        common.require("gcloud")
    for cmd in cmds:
        if args.dry_run:
            print(common.show(cmd))
        else:
            common.run(cmd)
    if "run" in args.steps:
        print("# follow worker 0:", common.show(ssh(args, f"tail -f {LOG}", worker="0")), file=sys.stderr)


if __name__ == "__main__":
    main()
