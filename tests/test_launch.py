"""The launch scripts (launch/tpu_vm.py, launch/gpu.py) run as subprocesses, checked through what
--dry-run prints. Nothing here runs gcloud, sbatch or ssh: the only runs without --dry-run have
an empty PATH and must stop with a clear error. No JAX needed."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JAX_VERSION = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
TPU = ["tpu_vm.py", "--name=umr-test", "--zone=us-central2-b"]
WORKDIR = "/mnt/umr/run 1"  # a space: the commands must quote it
OVERRIDES = ["--overrides=--config.k=50", "--overrides", "data.corpus=/mnt/umr/psgs w100.tsv"]
BINARY_ARGS = ["-m", "umr_jax.main", "--config=configs/xor.py", f"--workdir={WORKDIR}", "--config.k=50",
               "--config.data.corpus=/mnt/umr/psgs w100.tsv"]
COORDINATION = ("--coordinator_address", "--num_processes", "--process_id")


def launch(script: str, *args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60, check=False)


def dry_run(script: str, *args: str, cwd: Path | None = None) -> str:
    done = launch(script, *args, "--dry-run", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def commands(script: str, *args: str) -> list[list[str]]:
    """The printed commands, one per line, as argv lists."""
    return [shlex.split(line) for line in dry_run(script, *args).splitlines()]


def remote(cmd: list[str]) -> str:
    """The shell command of a `gcloud compute tpus tpu-vm ssh` (checked for bash syntax)."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in cmd
    [command] = [arg.removeprefix("--command=") for arg in cmd if arg.startswith("--command=")]
    assert_bash_syntax(command)
    return command


def assert_bash_syntax(script: str) -> None:
    if shutil.which("bash"):
        checked = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr


def test_tpu_vm_create_setup_run():
    mount = "mountpoint -q /mnt/umr || gcsfuse --implicit-dirs my-bucket /mnt/umr"
    create, setup, run = commands(*TPU, "--repo=https://example.com/umr_jax.git", "--branch=dev",
                                  f"--workdir={WORKDIR}", f"--mount={mount}", *OVERRIDES)

    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "umr-test"]
    for flag in ("--zone=us-central2-b", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"):
        assert flag in create
    assert "--spot" not in create and not any(arg.startswith("--project") for arg in create)

    setup = remote(setup)
    assert "git clone --branch dev https://example.com/umr_jax.git umr_jax" in setup
    assert "--python 3.11" in setup
    assert f"-r requirements.txt 'jax[tpu]=={JAX_VERSION}'" in setup

    run = remote(run)
    assert run.index(mount) < run.index("cd umr_jax") < run.index("nohup")
    job = re.search(r"nohup (.*) >> ~/umr_jax\.log 2>&1 < /dev/null &", run)
    assert job, run
    assert shlex.split(job.group(1)) == [".venv/bin/python", *BINARY_ARGS]
    assert not any(flag in run for flag in COORDINATION)  # Cloud TPU: JAX finds the workers itself


def test_tpu_vm_queued_spot_with_delete():
    cmds = commands(*TPU, "--queued", "--spot", "--project=my-proj", "--accelerator_type=v5litepod-16",
                    "--steps=delete,run,create,setup", "--repo=https://example.com/umr_jax.git", f"--workdir={WORKDIR}")
    create, wait, setup, run, delete = cmds  # in the order of the steps, not of --steps

    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "umr-test"]
    for flag in ("--node-id=umr-test", "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v5litepod-16",
                 "--runtime-version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in create
    assert "tpu-vm" not in create

    assert wait[:2] == ["bash", "-c"]  # ssh must wait for the queued resource to be ACTIVE
    assert "queued-resources describe umr-test" in wait[2] and "ACTIVE) break" in wait[2]
    assert_bash_syntax(wait[2])

    assert "--project=my-proj" in setup and "--project=my-proj" in run
    remote(setup)
    remote(run)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "umr-test"]
    assert "--force" in delete and "--quiet" in delete


def test_tpu_vm_steps_subset_and_runtime():
    [run] = commands(*TPU, "--steps=run", f"--workdir={WORKDIR}")  # no --repo needed without setup
    assert "umr_jax.main" in remote(run)
    [delete] = commands(*TPU, "--steps=delete")  # no --workdir needed without run
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "umr-test", "--zone=us-central2-b", "--quiet"]
    [create] = commands(*TPU, "--steps=create", "--runtime_version=tpu-vm-v4-base")
    assert "--version=tpu-vm-v4-base" in create


def test_a_bucket_workdir_reaches_the_binary_as_given(tmp_path):
    """gs:// workdirs are written by the binary itself (umr_jax/storage.py): no mount, no abspath."""
    setup, run = commands(*TPU, "--steps=setup,run", "--repo=r", "--workdir=gs://my-bucket/umr/xor")
    gcsfs = re.search(r'^gcs = \["(gcsfs==[^"]+)"\]', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert remote(setup).endswith(f"-r requirements.txt 'jax[tpu]=={JAX_VERSION}' {gcsfs}")
    assert "--workdir=gs://my-bucket/umr/xor" in shlex.split(re.search(r"nohup (.*) >>", remote(run)).group(1))
    [cmd] = [shlex.split(line) for line in dry_run("gpu.py", "single", "--workdir=gs://my-bucket/run",
                                                      cwd=tmp_path).splitlines()]
    assert "--workdir=gs://my-bucket/run" in cmd


def test_gpu_single(tmp_path):
    [cmd] = [shlex.split(line) for line in dry_run("gpu.py", "single", "--workdir=rel/run", "--overrides=k=5",
                                                      "--mem_fraction=0.8", cwd=tmp_path).splitlines()]
    assert cmd == ["cd", str(REPO), "&&", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8", sys.executable, "-m",
                   "umr_jax.main", "--config=configs/xor.py", f"--workdir={tmp_path / 'rel' / 'run'}", "--config.k=5"]


def test_gpu_slurm(tmp_path):
    script = dry_run("gpu.py", "slurm", "--nodes=3", "--gpus_per_node=4", "--partition=a100", "--time=1-00:00:00",
                     f"--workdir={WORKDIR}", "--python=/shared/venv/bin/python", *OVERRIDES, cwd=tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=a100", "#SBATCH --time=1-00:00:00", f"cd {REPO}"):
        assert line in lines
    assert not any(line.startswith("#SBATCH --account") for line in lines)
    # Five minutes before the time limit SLURM sends SIGUSR1: the run checkpoints, exits 75, the job requeues.
    assert "#SBATCH --signal=USR1@300" in lines and "#SBATCH --requeue" in lines
    [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
    binary = [*BINARY_ARGS[:4], '--config.reliability.preemption_signals=("SIGTERM","SIGUSR1")', *BINARY_ARGS[4:]]
    assert srun == ["srun", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "/shared/venv/bin/python", *binary,
                    "||", "status=$?"]
    assert 'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in lines
    assert not any(flag in script for flag in COORDINATION)  # JAX reads the SLURM environment
    assert_bash_syntax(script)
    assert not list(tmp_path.iterdir())  # a dry run writes no script


def test_gpu_manual():
    hosts = ["gpu0.cluster", "gpu1.cluster", "gpu2.cluster"]
    cmds = commands("gpu.py", "manual", f"--hosts={','.join(hosts)}", "--port=5555", f"--workdir={WORKDIR}",
                    *OVERRIDES)
    assert len(cmds) == len(hosts)
    for i, (cmd, host) in enumerate(zip(cmds, hosts, strict=True)):
        assert cmd[:2] == ["ssh", host] and len(cmd) == 3
        job = shlex.split(cmd[2])
        assert job[:3] == ["cd", str(REPO), "&&"]
        assert job[6:] == [*BINARY_ARGS, "--coordinator_address=gpu0.cluster:5555", "--num_processes=3",
                           f"--process_id={i}"]


@pytest.mark.parametrize(("args", "flag"), [
    ([*TPU, "--repo=r"], "--workdir"),
    ([*TPU, "--steps=run", "--workdir=relative/dir"], "--workdir"),
    ([*TPU, "--steps=run", "--workdir=s3://bucket/run"], "--workdir"),
    (["gpu.py", "single", "--workdir=gs://"], "--workdir"),
    ([*TPU, "--workdir=/w"], "--repo"),
    ([*TPU, "--steps=create,boot"], "--steps"),
    (["tpu_vm.py", "--zone=z", "--steps=delete"], "--name"),
    ([*TPU, "--steps=run", "--workdir=/w", "--overrides=--learning_rate=1"], "--overrides"),
    (["gpu.py", "manual", "--workdir=/w"], "--hosts"),
    (["gpu.py", "manual", "--hosts=a,,b", "--workdir=/w"], "--hosts"),
    (["gpu.py", "slurm"], "--workdir"),
    (["gpu.py", "slurm", "--nodes=0", "--workdir=/w"], "--nodes"),
    (["gpu.py", "--workdir=/w"], "single,slurm,manual"),
])
def test_bad_input_names_the_flag(args, flag):
    done = launch(*args, "--dry-run")
    assert done.returncode != 0
    assert flag in done.stderr.splitlines()[-1], done.stderr
    assert not done.stdout


@pytest.mark.parametrize(("args", "executable"), [
    ([*TPU, "--steps=create"], "gcloud"),
    (["gpu.py", "slurm", "--workdir=/w"], "sbatch"),
    (["gpu.py", "manual", "--hosts=a,b", "--workdir=/w"], "ssh"),
])
def test_missing_executable_is_a_clear_error(tmp_path, args, executable):
    empty = tmp_path / "bin"
    empty.mkdir()
    done = launch(*args, cwd=tmp_path, env={**os.environ, "PATH": str(empty)})
    assert done.returncode != 0
    assert f"{executable!r} not found on PATH" in done.stderr, done.stderr
    assert sorted(tmp_path.iterdir()) == [empty]  # nothing written (no sbatch script)
