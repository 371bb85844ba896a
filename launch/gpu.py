#!/usr/bin/env python3
"""Run umr_jax on GPUs: one node, a SLURM job, or hosts started by hand over ssh.

Why a script: the three ways differ only in how the processes are started and how they find each
other, while every process runs the same `python -m umr_jax.main` line. --dry-run prints the
command(s) or the sbatch script instead of running them. One process per node drives all of that
node's GPUs.

Modes:
  single  one node, all its GPUs, one process: runs the command (exec) in the repo
  slurm   an sbatch script (#SBATCH --nodes=N --ntasks-per-node=1 --gpus-per-node=G; srun the
          binary), written to --script and submitted with sbatch; jax.distributed.initialize()
          reads the SLURM environment, so no coordinator flags
  manual  one process per --hosts entry over ssh, with --coordinator_address=HOST0:PORT
          --num_processes=N --process_id=I

slurm and manual expect the repo (--repo_dir) and the Python environment (--python) at the same
paths on every node, and --workdir on a filesystem every node sees (NFS, Filestore) or a gs://
bucket URL. Re-running the same command resumes the run from the workdir.

    python launch/gpu.py single --workdir=/tmp/umr-xor --overrides=--config.k=50
    python launch/gpu.py slurm --nodes=4 --gpus_per_node=8 --workdir=/shared/umr-xor --dry-run > umr.sbatch
    python launch/gpu.py manual --hosts=gpu0,gpu1 --workdir=/shared/umr-xor --dry-run
"""

import argparse
import os
import subprocess
import sys

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = argparse.ArgumentParser(add_help=False)
    common.add_run_args(shared, workdir_required=True)
    shared.add_argument("--python", default=sys.executable,
                        help="the Python of the umr_jax environment, on every node (default: this one)")
    shared.add_argument("--repo_dir", default=str(common.REPO),
                        help="the umr_jax checkout, on every node (default: this one)")
    shared.add_argument("--mem_fraction", default="0.9", help="XLA_PYTHON_CLIENT_MEM_FRACTION: the share of "
                        "each GPU's memory JAX preallocates (JAX's default 0.75); lower it if NCCL runs out")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{single,slurm,manual}")
    modes.add_parser("single", parents=[shared], help="one node, one process")
    slurm = modes.add_parser("slurm", parents=[shared], help="an sbatch job, one process per node")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes")
    slurm.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node")
    slurm.add_argument("--job_name", default="umr_jax")
    slurm.add_argument("--partition", help="#SBATCH --partition")
    slurm.add_argument("--account", help="#SBATCH --account")
    slurm.add_argument("--time", help="#SBATCH --time, e.g. 2-00:00:00")
    slurm.add_argument("--script", default="umr_jax.sbatch", help="where to write the sbatch script")
    slurm.add_argument("--notice_seconds", type=int, default=300,
                       help="SIGUSR1 this long before the time limit (#SBATCH --signal): the run checkpoints, exits "
                       "with status 75 and the job requeues itself; 0: no notice")
    manual = modes.add_parser("manual", parents=[shared], help="one process per host over ssh")
    manual.add_argument("--hosts", required=True, help="comma-separated hosts; the first is the coordinator")
    manual.add_argument("--port", type=int, default=1234, help="the coordinator's port on the first host")
    args = parser.parse_args(argv)

    common.check_workdir(parser, args.workdir)
    if not common.is_bucket(args.workdir):
        args.workdir = os.path.abspath(args.workdir)
    if args.mode == "slurm" and min(args.nodes, args.gpus_per_node) < 1:
        parser.error("--nodes and --gpus_per_node must be at least 1")
    if args.mode == "manual":
        args.hosts = args.hosts.split(",")
        if not all(args.hosts):
            parser.error("--hosts: expected host names separated by commas, e.g. --hosts=gpu0,gpu1")
    return args


# The run's preemption notices under SLURM: SIGTERM (preemption, scancel) and SIGUSR1 (#SBATCH --signal).
SLURM_NOTICES = '--config.reliability.preemption_signals=("SIGTERM","SIGUSR1")'


def sbatch_script(args: argparse.Namespace, job: list[str]) -> str:
    options = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
               "gpus-per-node": args.gpus_per_node, "partition": args.partition, "account": args.account,
               "time": args.time, "signal": f"USR1@{args.notice_seconds}" if args.notice_seconds else None}
    first_override = next(i for i, a in enumerate(job) if a.startswith("--workdir=")) + 1  # the user's win
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH --{key}={value}" for key, value in options.items() if value is not None),
        *(["#SBATCH --requeue"] if args.notice_seconds else []),
        f"# umr_jax on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), one process per node;",
        "# jax.distributed.initialize() reads the SLURM environment. Re-submitting resumes from the workdir.",
        "set -euo pipefail",
        common.show(["cd", args.repo_dir]),
        *([common.show(["srun", *job])] if not args.notice_seconds else [
            "# A preemption notice (SIGTERM, or SIGUSR1 before the time limit) stops the run at a checkpoint with",
            "# exit status 75: the job then requeues itself and resumes from the workdir.",
            "status=0",
            common.show(["srun", *job[:first_override], SLURM_NOTICES,
                         *job[first_override:]]) + " || status=$?",
            'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
            'exit "$status"']),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    job = common.main_argv(["env", f"XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction}", args.python], args)

    if args.mode == "single":
        if args.dry_run:
            print(common.show(job, cwd=args.repo_dir))
            return
        os.chdir(args.repo_dir)
        os.execvp(job[0], job)

    if args.mode == "slurm":
        script = sbatch_script(args, job)
        if args.dry_run:
            print(script, end="")
            return
        common.require("sbatch")
        with open(args.script, "w") as f:
            f.write(script)
        print(f"wrote {args.script}", file=sys.stderr)
        common.run(["sbatch", args.script])

    if args.mode == "manual":
        coordinator = f"--coordinator_address={args.hosts[0]}:{args.port}"
        cmds = [["ssh", host, common.show([*job, coordinator, f"--num_processes={len(args.hosts)}",
                                           f"--process_id={i}"], cwd=args.repo_dir)]
                for i, host in enumerate(args.hosts)]
        if args.dry_run:
            print("\n".join(map(common.show, cmds)))
            return
        common.require("ssh")
        procs = [subprocess.Popen(cmd) for cmd in cmds]  # all at once: each waits for the others
        failed = [host for host, proc in zip(args.hosts, procs, strict=True) if proc.wait()]
        if failed:
            sys.exit(f"error: the process failed on {', '.join(failed)}")


if __name__ == "__main__":
    main()
