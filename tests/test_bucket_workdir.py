"""A workdir on a bucket (--workdir=gs://...): every write through umr_jax.storage, no directory renames.

GCS is played by tests/gcs_standin.py: fsspec's gs:// on a local directory that refuses directory renames
and renames files by copy and delete, with Orbax's TensorStore kvstores routed to the same files.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import gcs_standin
import numpy as np
import pytest

from helpers import assert_same_result, recorded_stages, run_kill_chain
from umr_jax import atomic, storage, workdir_lock
from umr_jax.data.readers import ReadReport
from umr_jax.encode import EmbeddingStore

REPO = pathlib.Path(__file__).resolve().parents[1]
URL = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path):
    """The stand-in installed in this process (fsspec only); yields its root, with the bucket made."""
    (tmp_path / "bucket").mkdir()
    gcs_standin.install(tmp_path, orbax=False)
    try:
        yield tmp_path
    finally:
        gcs_standin.uninstall()


def test_the_layer_on_a_bucket_writes_whole_objects_and_renames_nothing(bucket, monkeypatch):
    local = bucket / "bucket" / "run"
    assert storage.resolve(URL + "/") == URL and storage.join(URL, "a", "b.json") == URL + "/a/b.json"
    atomic.write_json(URL + "/a/b.json", {"x": 1})
    assert atomic.read_json(URL + "/a/b.json") == {"x": 1} and storage.isdir(URL + "/a")
    # A writer that fails leaves no object (gcsfs would commit what was written when the file closes).
    with pytest.raises(RuntimeError), atomic.atomic_open(URL + "/half.txt", "w") as f:
        f.write("partial")
        raise RuntimeError("disk full")
    assert not storage.exists(URL + "/half.txt")

    # A directory is uploaded file by file: the old commit file goes first, the new one comes last.
    def index(tmp: str) -> None:
        for name in ("index.json", "embeddings.npy"):
            pathlib.Path(tmp, name).write_text(name)

    atomic.replace_dir(URL + "/index", index, commit="index.json")
    uploads: list[str] = []
    real_put = storage.put_file
    monkeypatch.setattr(storage, "put_file", lambda src, url: (uploads.append(url), real_put(src, url)))
    real_remove = storage.remove
    monkeypatch.setattr(storage, "remove", lambda url, **kw: (uploads.append(f"rm {url}"), real_remove(url, **kw)))
    atomic.replace_dir(URL + "/index", index, commit="index.json")
    assert uploads == [f"rm {URL}/index/index.json", f"{URL}/index/embeddings.npy", f"{URL}/index/index.json"]
    with storage.local_copy(URL + "/index") as copy:
        assert sorted(os.listdir(copy)) == ["embeddings.npy", "index.json"]

    # Embedding chunks: committed by their marker, found by globbing the bucket.
    store = EmbeddingStore(URL + "/embeddings")
    store.write_chunk(0, ["a", "b"], np.ones((2, 4), np.float32), ReadReport("x", 2, 2))
    (local / "embeddings" / "chunk-000001.npy").parent.mkdir(exist_ok=True)
    (local / "embeddings" / "chunk-000001.npy").write_bytes(b"\x93NUMPY truncated")  # data without a marker
    assert store.valid_chunks() == {0}
    ids, emb = store.load()
    assert ids == ["a", "b"] and emb.shape == (2, 4)

    # The workdir lock: best effort on a bucket (no O_EXCL), but a live holder still keeps others out.
    lock = workdir_lock.WorkdirLock(URL).acquire()
    assert atomic.read_json(URL + "/lock.json")["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirInUseError):
        workdir_lock.WorkdirLock(URL).acquire(timeout=0.1)
    lock.release()
    assert not storage.exists(URL + "/lock.json")
    assert gcs_standin.renames(bucket) == []
    assert not (pathlib.Path.cwd() / "gs:").exists()  # no os.path.abspath('gs://...') anywhere


def test_a_scann_index_on_a_bucket_is_staged_locally_and_uploaded(bucket):
    """ScaNN reads and writes local directories: saved through a local stage, loaded from a download."""
    from umr_jax import index

    rng = np.random.default_rng(0)
    db, queries = rng.standard_normal((6000, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    cfg = index.default_config()
    cfg.scann.brute_force_below = 1000  # a real tree + AH index, several files
    built = index.build_index(db, cfg, k=10)
    built.save(URL + "/index")
    assert "index.json" in storage.listdir(URL + "/index") and len(storage.listdir(URL + "/index")) > 3
    loaded = index.load_index(URL + "/index", cfg)
    np.testing.assert_array_equal(loaded.search(queries, 10).indices, built.search(queries, 10).indices)
    assert gcs_standin.renames(bucket) == []


def test_a_bucket_without_its_filesystem_is_one_clear_error(monkeypatch):
    import fsspec

    def missing(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    monkeypatch.setenv("EPATH_USE_TF", "0")
    with pytest.raises(storage.FilesystemUnavailableError, match=r"pip install gcsfs==\d"):
        storage.resolve("gs://bucket/run")
    assert f'gcs = ["{storage.GCSFS_PIN}"]' in (REPO / "pyproject.toml").read_text()  # one pin


# ----------------------------------------------------------------------------- a run on the bucket, killed

# One run, killed in turn inside encoding, teacher scoring and training; each re-run resumes.
KILL_CHAIN = [
    ("encode.chunk_committed", "round-0/encode"),
    ("teacher.chunk_committed", "round-1/teacher"),
    ("train.checkpoint_saved", "round-1/train"),
]


def _run_on_bucket(root: pathlib.Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m umr_jax.main on configs/tiny.py with --workdir=gs://bucket/run, through the stand-in."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", gcs_standin.ROOT_ENV: str(root),
           **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "tests" / "gcs_standin.py"),
                           f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={URL}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_on_a_bucket_killed_in_every_long_stage_resumes_to_the_same_result(tiny_run, tmp_path):
    (tmp_path / "bucket").mkdir()
    workdir = tmp_path / "bucket" / "run"  # where the stand-in keeps gs://bucket/run
    marks = run_kill_chain(workdir, KILL_CHAIN, lambda env: _run_on_bucket(tmp_path, env=env))
    done = _run_on_bucket(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"metrics: {URL}/metrics.json" in done.stdout
    # Committed chunks and checkpoints were kept, not redone; Orbax committed steps with its commit file.
    assert (workdir / "round-0/embeddings/chunk-000000.json").stat().st_mtime_ns == marks["chunk"]
    assert (workdir / "round-1/teacher/chunk-000000.npy").stat().st_mtime_ns == marks["teacher"]
    assert recorded_stages(workdir)["round-1/train"]["info"]["resumed_at"] == 2
    assert (workdir / "round-1/checkpoints/4/commit_success.txt").exists()
    # Nothing was renamed on the bucket (no directory, not even a file), nothing written beside it.
    assert gcs_standin.renames(tmp_path) == []
    assert not (REPO / "gs:").exists() and not (workdir / "lock.json").exists()
    assert list((workdir / "tensorboard").iterdir())
    # ... and the result is the uninterrupted local run's, bit for bit.
    assert_same_result(workdir, tiny_run)
