"""A run directory that survives kill -9: stages, their manifest, and the config they were run with.

Each stage writes its outputs (atomically, or as chunks with commit markers)
and only then is recorded in `manifest.json` (itself replaced atomically). A
re-run skips recorded stages and redoes an unrecorded one, which picks up its
own partial progress (embedding chunks, teacher-score chunks, Orbax steps).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import logging
from flax.traverse_util import flatten_dict

from umr_jax import atomic, distributed, storage

MANIFEST = "manifest.json"
CONFIG = "config.json"


# Keys that change how a run meets faults or where it caches compiled programs, never
# what it computes: a resumed run may change them (e.g. a SLURM job adds SIGUSR1).
RESULT_NEUTRAL_KEYS = ("reliability.", "compilation_cache_dir")


class ConfigMismatchError(ValueError):
    pass


class RecordError(ValueError):
    """manifest.json or config.json is damaged (truncated, not JSON, or hand-edited into another shape)."""


class MissingOutputError(FileNotFoundError):
    """A stage recorded as done lacks an output (deleted, or a workdir assembled by hand)."""


# What to do about a damaged record, for its one-line error.
_REDO_MANIFEST = ("delete it to run the stages again (committed chunks, indexes and checkpoints are reused), or use "
                  "a new --workdir")
_REDO_CONFIG = ("it records the config this workdir was run with: restore it, or delete it if you resume with the "
                "same config, or use a new --workdir")


def _read_record(path: str, what_to_do: str) -> Any:
    try:
        return atomic.read_json(path)
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not valid JSON (not UTF-8 text): {what_to_do}") from None
    except ValueError as e:
        raise RecordError(f"{path}: not valid JSON ({e}), truncated or edited: {what_to_do}") from None


def _check_manifest(path: str, manifest: Any) -> dict[str, Any]:
    """The manifest, if it has the shape `record` writes: {"stages": {name: {"finished": ..., "seconds": ...}}}."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        found = (type(manifest).__name__ if not isinstance(manifest, dict)
                 else f"'stages' is {type(manifest.get('stages')).__name__}")
        raise RecordError(f"{path}: expected {{\"stages\": {{stage: entry}}}}, found {found}: {_REDO_MANIFEST}")
    for name, entry in manifest["stages"].items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("finished"), str)
              and isinstance(entry.get("seconds"), int | float) and not isinstance(entry.get("seconds"), bool)
              and isinstance(entry.get("info", {}), dict))
        if not ok:
            raise RecordError(f"{path}: the entry of stage {name!r} is not one this program writes (it needs "
                              f"'finished' and 'seconds'; found {json.dumps(entry)[:80]}): delete the entry to "
                              "redo the stage, or use a new --workdir")
    return manifest


class RunDir:
    """The workdir of one run; stages are recorded in order with their wall time."""

    def __init__(self, path: str, cfg: ml_collections.ConfigDict, *, writable: bool = True):
        """`writable=False`: a reader of a workdir another process owns (multi-process runs: process 0 writes)."""
        self.path = storage.resolve(path)  # absolute, or a bucket URL (gs://) as given
        self.writable = writable
        if writable:
            try:
                storage.makedirs(self.path)
                probe = os.path.join(self.path, ".write-test")
                atomic.write_text(probe, "ok\n")
                storage.remove(probe)
            except OSError as e:
                raise OSError(f"--workdir={path}: not writable ({e.strerror or e})") from None
            except Exception as e:  # a bucket's client errors (auth, HTTP) are not OSErrors
                if not storage.is_remote(self.path):
                    raise
                raise OSError(f"--workdir={path}: not writable ({type(e).__name__}: {e})") from None
        self._check_config(cfg)
        manifest_path = os.path.join(self.path, MANIFEST)
        self.manifest: dict[str, Any] = (_check_manifest(manifest_path, _read_record(manifest_path, _REDO_MANIFEST))
                                         if storage.exists(manifest_path) else {"stages": {}})

    def _check_config(self, cfg: ml_collections.ConfigDict) -> None:
        """A workdir belongs to one config: resuming with another would mix two runs' outputs."""
        path = os.path.join(self.path, CONFIG)
        current = json.loads(cfg.to_json_best_effort())
        if not storage.exists(path):
            atomic.write_json(path, current)
            return
        saved = _read_record(path, _REDO_CONFIG)
        if not isinstance(saved, dict):
            raise RecordError(f"{path}: expected a JSON object (a config), found {type(saved).__name__}: "
                              f"{_REDO_CONFIG}")
        a, b = flatten_dict(saved, sep="."), flatten_dict(current, sep=".")
        changed = sorted(k for k in a.keys() | b.keys()
                         if a.get(k) != b.get(k) and not k.startswith(RESULT_NEUTRAL_KEYS))
        if changed:
            details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:8])
            raise ConfigMismatchError(f"{path}: this workdir was run with another config ({details}); resume with "
                                 "the same config or use a new --workdir")

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def done(self, stage: str) -> bool:
        return stage in self.manifest["stages"]

    def record(self, stage: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.manifest["stages"][stage] = {
            "seconds": round(seconds, 3),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "info": info or {}}
        if self.writable:
            atomic.write_json(self.sub(MANIFEST), self.manifest)

    def stage(self, name: str, fn: Callable[[], dict | None], *,
              outputs: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> bool:
        """Runs `fn` unless the stage is recorded; returns whether it ran.

        `outputs`: the files or directories the stage leaves (relative to the workdir, or absolute), or a
        function giving them. A recorded stage is skipped only if they all exist; a missing one is a
        MissingOutputError naming it, never a later stage reading what is not there.
        """
        if self.done(name):
            self.check_outputs(name, outputs)
            logging.info("stage %s: done at %s, skipping", name, self.manifest["stages"][name]["finished"])
            return False
        logging.info("stage %s: starting", name)
        start = time.perf_counter()
        info = fn() or {}
        seconds = time.perf_counter() - start
        # Every process finishes its part before process 0 records the stage: a stage that another
        # process died in is redone on resume, not skipped (a no-op for one process).
        distributed.barrier(name)
        self.record(name, seconds, info)
        logging.info("stage %s: finished in %.1fs", name, seconds)
        return True

    def check_outputs(self, name: str, outputs: Sequence[str] | Callable[[], Sequence[str]] | None) -> None:
        paths = list((outputs() if callable(outputs) else outputs) or [])
        missing = [p for p in paths if not storage.exists(storage.join(self.path, p))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingOutputError(
                f"{self.sub(MANIFEST)} records stage {name} as done but {os.path.join(self.path, missing[0])} is "
                f"missing{more}: delete the stage's entry from {MANIFEST} to redo it, or use a new --workdir")

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.manifest["stages"].items()}
