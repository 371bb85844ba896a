"""Test setup: an 8-device simulated CPU mesh, before anything imports JAX."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache per test session: programs compiled again by later
# tests (a new Trainer per run of the tiny config) load instead of compiling.
import atexit
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="umr-jax-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import pathlib

import jax
import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read ../shared/data beside the clone")
    return SHARED_DATA


@pytest.fixture(scope="session")
def eight_devices() -> None:
    assert jax.device_count() == 8, "tests expect XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted run of configs/tiny.py the README's way (python -m umr_jax.main): the reference."""
    from helpers import run_tiny

    workdir = tmp_path_factory.mktemp("tiny") / "run"
    done = run_tiny(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2:" in done.stdout
    return workdir
