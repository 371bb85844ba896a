"""The one file-system layer of a workdir: local paths and bucket URLs (`gs://bucket/dir`).

Every read and write of a workdir goes through here (or through
:mod:`umr_jax.atomic`, which writes through here). A local path uses the os
module exactly as before: POSIX renames make files and directories appear
whole. A URL (anything with `://`; in practice `gs://`) goes through
`etils.epath`, which Orbax uses too: on `gs://` that is fsspec's `gcs`
filesystem (gcsfs), or `tf.io.gfile` when TensorFlow is installed. A bucket
cannot rename a directory, and renaming a file is a copy and a delete, so
remote writes never rename: a file is written locally first and uploaded as
one object (an object appears whole or not at all), and a directory is
uploaded file by file with its commit file last (`upload_dir`), after the
old commit file is deleted first.

Local paths come back absolute (`resolve`); URLs are kept as they are
(`os.path.abspath` would turn `gs://b/x` into `$PWD/gs:/b/x`).

  paths     is_remote, resolve, join, check_available
  reading   exists, isdir, listdir, glob, mtime, open (reads only), read_text, load_npy, local_copy
  writing   makedirs, remove, rmtree, put_file, upload_dir (atomic writes: umr_jax.atomic's
            atomic_open, write_text, write_json, save_npy, replace_dir(commit=...))
"""

from __future__ import annotations

import builtins
import contextlib
import glob as globlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

GCSFS_PIN = "gcsfs==2026.10.1"


class FilesystemUnavailableError(OSError):
    """A URL whose filesystem is not installed (gs:// without gcsfs): a user error, one line."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def _epath(path: str | os.PathLike) -> Any:
    from etils import epath
    return epath.Path(os.fspath(path))


def check_available(path: str | os.PathLike) -> None:
    """Raises FilesystemUnavailableError if the filesystem of URL `path` cannot be used here (gcsfs missing)."""
    path = os.fspath(path)
    if not is_remote(path):
        return
    scheme = path.split("://", 1)[0]
    if scheme == "gs":
        import importlib.util
        if importlib.util.find_spec("tensorflow") is not None and os.environ.get("EPATH_USE_TF", "1").lower() not in (
                "false", "no", "f", "0"):
            return  # epath uses tf.io.gfile for gs://
    try:
        import fsspec
        # epath asks fsspec for 'gcs' (the same filesystem as 'gs').
        fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
    except (ImportError, ValueError) as e:
        extra = f"pip install {GCSFS_PIN} (or pip install -e .[gcs])" if scheme == "gs" else str(e)
        raise FilesystemUnavailableError(f"{path}: {scheme}:// paths need their fsspec filesystem: {extra}") from None


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL without a trailing slash (its filesystem checked to be usable)."""
    path = os.fspath(path)
    if is_remote(path):
        check_available(path)
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that also joins onto URLs (an absolute part or a URL part starts over, as in os.path)."""
    out = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        if is_remote(part) or part.startswith("/"):
            out = part
        elif out:
            out = out.rstrip("/") + "/" + part if is_remote(out) else os.path.join(out, part)
        else:
            out = part
    return out


# ----------------------------------------------------------------------------- reading and listing


def exists(path: str | os.PathLike) -> bool:
    """A file, or a directory (on a bucket: a prefix that holds at least one object)."""
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a directory (FileNotFoundError if there is none)."""
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
    """Paths (URLs for a URL directory) in `directory` matching the glob `pattern`, sorted."""
    if is_remote(directory):
        return sorted(os.fspath(p) for p in _epath(directory).glob(pattern))
    return sorted(globlib.glob(os.path.join(os.fspath(directory), pattern)))


def mtime(path: str | os.PathLike) -> float:
    """Modification time in seconds (whole seconds on a bucket)."""
    return float(_epath(path).stat().mtime) if is_remote(path) else os.stat(path).st_mtime


def open(path: str | os.PathLike, mode: str = "r") -> IO:
    """Opens a file for reading (text in UTF-8). Writes go through :mod:`umr_jax.atomic`."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"storage.open is for reading (mode {mode!r}); write with umr_jax.atomic")
    if is_remote(path):
        f = _epath(path).open("rb")
        return f if "b" in mode else io.TextIOWrapper(f, encoding="utf-8")  # not the locale's encoding
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_text(path: str | os.PathLike) -> str:
    with open(path) as f:
        return f.read()


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """A .npy file without pickle; memory-mapped if `mmap` and local (a bucket object is read whole)."""
    if is_remote(path):
        with open(path, "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# ----------------------------------------------------------------------------- writing (atomic.py builds on these)


def makedirs(path: str | os.PathLike) -> None:
    """A directory and its parents (on a bucket nothing: prefixes exist once an object is under them)."""
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str | os.PathLike, missing_ok: bool = True) -> None:
    if is_remote(path):
        _epath(path).unlink(missing_ok=missing_ok)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: str | os.PathLike) -> None:
    """Removes a directory and everything in it, if it exists."""
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def put_file(local: str | os.PathLike, url: str) -> None:
    """Uploads local file `local` as the one object `url` (it appears whole, or not at all, on a bucket)."""
    with builtins.open(local, "rb") as src, _epath(url).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def upload_dir(local: str, url: str, commit: str | None = None) -> None:
    """Replaces directory `url` by the files of local directory `local`, without renaming anything.

    The old directory's `commit` file goes first and the new one's comes last: a reader that trusts the
    directory only when `commit` exists (index.json, config.json) never sees a mix of old and new files.
    """
    if commit is not None:
        remove(join(url, commit))
    rmtree(url)
    files = sorted(os.path.relpath(os.path.join(root, name), local)
                   for root, _, names in os.walk(local) for name in names)
    if commit is not None and commit in files:
        files = [f for f in files if f != commit] + [commit]
    for rel in files:
        put_file(os.path.join(local, rel), join(url, *rel.split(os.sep)))


def download_dir(url: str, local: str) -> None:
    """Copies every file under directory `url` into local directory `local` (made if missing)."""
    os.makedirs(local, exist_ok=True)
    for child in _epath(url).iterdir():
        target = os.path.join(local, child.name)
        if child.is_dir():
            download_dir(os.fspath(child), target)
        else:
            with child.open("rb") as src, builtins.open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)


@contextlib.contextmanager
def local_copy(directory: str) -> Iterator[str]:
    """A local directory with the files of `directory`: itself if local, else a temporary download."""
    if not is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="umr-jax-download-") as tmp:
        download_dir(directory, tmp)
        yield tmp
