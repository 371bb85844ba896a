"""A stand-in for a Google Cloud Storage bucket in tests: fsspec's `gs`/`gcs` protocol on a local directory.

    UMR_GCS_STANDIN_ROOT=/tmp/root python tests/gcs_standin.py --config=configs/tiny.py --workdir=gs://bucket/run

runs `python -m umr_jax.main ...` with the stand-in installed (runs are subprocesses that tests kill,
so the stand-in is installed here, in the launcher, not in the package). `gs://bucket/key` is the file
ROOT/bucket/key, and the bucket must exist (ROOT/bucket). Like GCS through gcsfs (and gcsfuse without
--rename-dir-limit), the stand-in

- refuses to rename a directory (OSError), and renames a file by a copy and a delete (not atomic);
- has no directories: mkdir is a no-op, and a "directory" exists while an object is under it;
- makes a written object appear whole when its file is closed (written aside, moved in at close), also
  when the writer raised: gcsfs finalises an upload on close as well, so a writer must not rely on an
  exception discarding what it wrote.

Every rename is appended to ROOT/.standin-log.jsonl (`renames(root)`), so a test can prove there was no
directory rename.

Orbax writes array data with TensorStore, which talks to GCS itself, not through fsspec. The seam:
Orbax builds TensorStore's kvstore spec of a gs:// path in one function,
`orbax.checkpoint._src.path.gcs_utils.get_kvstore_for_gcs`; `install()` maps it to a `file` kvstore on
the same ROOT/bucket/key, while Orbax still sees gs:// paths (so it uses its commit-file atomicity,
`_src/path/atomicity_defaults.py`, instead of renaming step directories). It also reports buckets as flat
(no hierarchical namespace), which Orbax would otherwise ask google-cloud-storage about.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import uuid

import fsspec
from fsspec.spec import AbstractFileSystem

ROOT_ENV = "UMR_GCS_STANDIN_ROOT"
LOG = ".standin-log.jsonl"
_UPLOADS = ".uploads"  # objects being written (an upload in progress is invisible)
_root: str | None = None


def root() -> str:
    path = _root or os.environ.get(ROOT_ENV)
    if not path:
        raise RuntimeError(f"the GCS stand-in has no root: call install(root) or set {ROOT_ENV}")
    return path


def renames(at: str) -> list[dict]:
    """Every rename the stand-in under `at` saw: {"op": "file-rename"|"dir-rename-refused", "src", "dst"}."""
    path = os.path.join(at, LOG)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _log(op: str, src: str, dst: str) -> None:
    with open(os.path.join(root(), LOG), "a", encoding="utf-8") as f:
        f.write(json.dumps({"op": op, "src": src, "dst": dst, "pid": os.getpid()}) + "\n")


class _Upload(io.FileIO):
    """An object being written: a hidden file, moved into place (whole) when closed."""

    def __init__(self, final: str):
        os.makedirs(os.path.join(root(), _UPLOADS), exist_ok=True)
        self._tmp, self._final = os.path.join(root(), _UPLOADS, uuid.uuid4().hex), final
        super().__init__(self._tmp, "wb")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.makedirs(os.path.dirname(self._final), exist_ok=True)
        os.replace(self._tmp, self._final)  # the store's own object finalisation, not the writer's rename


class StandInGCS(AbstractFileSystem):
    """gs:// on ROOT: objects are files, directories are only prefixes of objects."""

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False

    def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close=...) mean nothing here
        super().__init__()

    def _local(self, path: str) -> str:
        return os.path.join(root(), self._strip_protocol(path))

    @staticmethod
    def _holds_objects(local: str) -> bool:
        return any(names for _, _, names in os.walk(local))

    def _file_info(self, name: str, local: str) -> dict:
        st = os.stat(local)
        return {"name": name, "type": "file", "size": st.st_size, "mtime": st.st_mtime}

    def info(self, path, **kwargs) -> dict:
        name = self._strip_protocol(path)
        local = self._local(name)
        if os.path.isfile(local):
            return self._file_info(name, local)
        if os.path.isdir(local) and ("/" not in name or self._holds_objects(local)):  # a bucket, or a prefix
            return {"name": name, "type": "directory", "size": 0}
        raise FileNotFoundError(errno.ENOENT, "no such object", path)

    def ls(self, path, detail=True, **kwargs):
        info = self.info(path)
        if info["type"] == "file":
            entries = [info]
        else:
            name, local, entries = info["name"], self._local(info["name"]), []
            for child in sorted(os.listdir(local)):
                child_name, child_local = f"{name}/{child}", os.path.join(local, child)
                if os.path.isfile(child_local):
                    entries.append(self._file_info(child_name, child_local))
                elif self._holds_objects(child_local):
                    entries.append({"name": child_name, "type": "directory", "size": 0})
        return entries if detail else [e["name"] for e in entries]

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        local = self._local(path)
        if "r" in mode:
            return open(local, "rb")
        if "w" in mode:
            return _Upload(local)
        raise ValueError(f"stand-in GCS: mode {mode!r} is not supported")

    def mkdir(self, path, create_parents=True, **kwargs) -> None:
        pass  # no directories on a bucket

    def makedirs(self, path, exist_ok=False) -> None:
        pass

    def rmdir(self, path) -> None:
        pass

    def rm_file(self, path) -> None:
        local = self._local(path)
        if os.path.isfile(local):
            os.remove(local)

    def _rm(self, path) -> None:
        self.rm_file(path)

    def cp_file(self, path1, path2, **kwargs) -> None:
        with open(self._local(path1), "rb") as src, _Upload(self._local(path2)) as dst:
            dst.write(src.read())

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs) -> None:
        if self.isdir(path1):
            _log("dir-rename-refused", self._strip_protocol(path1), self._strip_protocol(path2))
            raise OSError(errno.EXDEV, "stand-in GCS: a bucket cannot rename a directory", path1)
        _log("file-rename", self._strip_protocol(path1), self._strip_protocol(path2))
        self.cp_file(path1, path2)  # a copy, then a delete: a reader in between sees both
        self.rm_file(path1)

    def created(self, path):
        return self.info(path).get("mtime")

    def modified(self, path):
        return self.info(path).get("mtime")


def _orbax_seam() -> None:
    """TensorStore's gs:// kvstores -> `file` kvstores on the stand-in's files; buckets are flat (no HNS)."""
    from orbax.checkpoint._src.path import gcs_utils

    def get_kvstore_for_gcs(ckpt_path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root(), bucket, key)}

    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


def install(at: str | os.PathLike | None = None, orbax: bool = True) -> None:
    """Registers the stand-in for gs:// (and gcs://) in this process; `at` (or $UMR_GCS_STANDIN_ROOT) is ROOT.

    `orbax`: also route Orbax's TensorStore kvstores of gs:// paths to the stand-in's files (for good).
    """
    global _root
    if at is not None:
        _root = os.fspath(at)
    root()
    for protocol in StandInGCS.protocol:
        fsspec.register_implementation(protocol, StandInGCS, clobber=True)
    _clear_epath_cache()
    if orbax:
        _orbax_seam()


def uninstall() -> None:
    """Undoes `install(orbax=False)`: gs:// is fsspec's (gcsfs) again."""
    global _root
    import importlib
    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is a read-only view
    for protocol in StandInGCS.protocol:
        registry.pop(protocol, None)
    _root = None
    _clear_epath_cache()


def _clear_epath_cache() -> None:
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem of a protocol


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, as with -m
    install()
    import runpy
    runpy.run_module("umr_jax.main", run_name="__main__", alter_sys=True)
