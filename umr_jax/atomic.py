"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every write goes to a temporary file in the same directory, is flushed and
fsynced, then renamed over the target (rename is atomic on POSIX filesystems).
On a bucket (a `gs://` URL: see :mod:`umr_jax.storage`), where a rename is a
copy and a delete, the file is written to a local temporary file and then
uploaded as one object, which appears whole or not at all; a directory is
uploaded file by file with its commit file last.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from umr_jax import storage


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary sibling of `path`; renames it to `path` only on success (on a bucket: uploads it)."""
    path = os.fspath(path)
    if storage.is_remote(path):
        with _remote_open(path, mode) as f:
            yield f
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _remote_open(url: str, mode: str) -> Iterator[IO]:
    """A local temporary file, uploaded to `url` as one object only if the block ends without an exception."""
    fd, tmp = tempfile.mkstemp(prefix=".umr-jax-upload-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        storage.put_file(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    with storage.open(path) as f:
        return json.load(f)


def replace_dir(directory: str | os.PathLike, write: Callable[[str], None], commit: str | None = None, *,
                sole_writer: bool = False) -> str:
    """Fills a temporary sibling directory with `write(tmp)`, then swaps it in for `directory`.

    `sole_writer`: nothing else writes `directory` now (a workdir's outputs, under its lock), so the
    temporary siblings that killed writers left (an index or a model: gigabytes) are removed first.
    Shared caches, which two runs may fill at once, keep the default.

    On a bucket `write` fills a local temporary directory, which is then uploaded in place of
    `directory` (storage.upload_dir): the old `commit` file is deleted first and the new one
    uploaded last, so readers that wait for it see the new directory whole.
    """
    if storage.is_remote(directory):
        directory = storage.resolve(directory)
        with tempfile.TemporaryDirectory(prefix="umr-jax-stage-") as tmp:
            write(tmp)
            storage.upload_dir(tmp, directory, commit=commit)
        return directory
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    prefix = os.path.basename(directory) + ".tmp-"
    if sole_writer:
        for stale in globlib.glob(os.path.join(globlib.escape(parent), globlib.escape(prefix) + "*")):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
