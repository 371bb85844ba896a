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
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging
from flax.traverse_util import flatten_dict

from umr_jax import atomic

MANIFEST = "manifest.json"
CONFIG = "config.json"


class ConfigMismatchError(ValueError):
    pass


class RunDir:
    """The workdir of one run; stages are recorded in order with their wall time."""

    def __init__(self, path: str, cfg: ml_collections.ConfigDict, *, writable: bool = True):
        """`writable=False`: a reader of a workdir another process owns (multi-process runs: process 0 writes)."""
        self.path = os.path.abspath(path)
        self.writable = writable
        if writable:
            try:
                os.makedirs(self.path, exist_ok=True)
                probe = os.path.join(self.path, ".write-test")
                atomic.write_text(probe, "ok\n")
                os.unlink(probe)
            except OSError as e:
                raise OSError(f"--workdir={path}: not writable ({e.strerror or e})") from None
        self._check_config(cfg)
        manifest_path = os.path.join(self.path, MANIFEST)
        self.manifest: dict[str, Any] = (atomic.read_json(manifest_path) if os.path.exists(manifest_path)
                                         else {"stages": {}})

    def _check_config(self, cfg: ml_collections.ConfigDict) -> None:
        """A workdir belongs to one config: resuming with another would mix two runs' outputs."""
        path = os.path.join(self.path, CONFIG)
        current = json.loads(cfg.to_json_best_effort())
        if not os.path.exists(path):
            atomic.write_json(path, current)
            return
        saved = atomic.read_json(path)
        a, b = flatten_dict(saved, sep="."), flatten_dict(current, sep=".")
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
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

    def stage(self, name: str, fn: Callable[[], dict | None]) -> bool:
        """Runs `fn` unless the stage is recorded; returns whether it ran."""
        if self.done(name):
            logging.info("stage %s: done at %s, skipping", name, self.manifest["stages"][name]["finished"])
            return False
        logging.info("stage %s: starting", name)
        start = time.perf_counter()
        info = fn() or {}
        seconds = time.perf_counter() - start
        self.record(name, seconds, info)
        logging.info("stage %s: finished in %.1fs", name, seconds)
        return True

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.manifest["stages"].items()}
