"""One run per workdir: an exclusive lock file, `<workdir>/lock.json`, that names its holder.

Two runs on one workdir would write the same chunks, manifest and Orbax
checkpoints. A run (process 0 of a multi-process run; the others work under
its lock) creates the lock file with O_CREAT | O_EXCL, so of two runs racing
exactly one wins. The file holds the holder's host, pid, the pid's start time
(field 22 of /proc/<pid>/stat, so that a reused pid is not taken for the
holder), the run's start and a heartbeat that a daemon thread refreshes every
`reliability.lock_heartbeat_seconds`. The holder deletes the file when it ends,
normally or by an exception; SIGKILL, a crash or a lost VM leave it behind.

A lock is stale, and the next run takes it over with a warning naming the old
holder, if

  (a) the holder is on this host (same hostname, boot and pid namespace) and its
      pid is gone, a zombie, or another process (another start time); or
  (b) the holder is elsewhere (another host, or the same hostname in another
      boot or pid namespace, e.g. a container) and its heartbeat is older than
      `reliability.lock_stale_seconds` (e.g. a preempted VM). Clocks of the
      hosts sharing a workdir are assumed to agree to well within that time.

A live holder on this host is never taken over, however old its heartbeat (a
stopped process may continue). Anything else is refused with one line naming
the holder (WorkdirInUseError, an OSError: the binaries report it as a user
error).

Taking over is race-free: a contender first claims the stale file by creating
`lock.json.takeover-<inode>-<mtime>` with O_EXCL (one claim per stale file),
checks that lock.json is still that file, removes it and O_EXCL-creates its own
lock; of several contenders exactly one ends up holding the lock.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

from umr_jax import atomic, storage

LOCK = "lock.json"
_TAKEOVER_GRACE_SECONDS = 60.0  # a takeover claim older than this was interrupted (its contender died)
_WRITE_GRACE_SECONDS = 10.0  # an unreadable lock file younger than this is being written by its creator


class WorkdirInUseError(OSError):
    """Another run holds the workdir."""


class WorkdirLockLostError(OSError):
    """This run's lock was taken over (its heartbeat went stale) or removed: another run may be writing."""


class _NotOursError(Exception):
    pass


# ----------------------------------------------------------------------------- who holds it


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command, which may hold spaces), or None."""
    text = _read(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    return text[text.rindex(")") + 1:].split()


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks after boot (/proc/<pid>/stat field 22), or None if unknown."""
    fields = _proc_stat(pid)
    return int(fields[22 - 3]) if fields and len(fields) > 22 - 3 else None


def _pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def holder_record(pid: int | None = None, *, started: datetime.datetime | None = None,
                  heartbeat: datetime.datetime | None = None, host: str | None = None) -> dict[str, Any]:
    """What a lock file says about its holder: `pid` (default: this process) on `host` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    now = _now()
    local = host is None
    return {"host": socket.gethostname() if local else host, "pid": pid,
            "pid_start": process_start_time(pid) if local else None,
            "boot_id": _read("/proc/sys/kernel/random/boot_id") if local else None,
            "pid_namespace": _pid_namespace() if local else None,
            "started": _iso(started or now), "heartbeat": _iso(heartbeat or now), "token": uuid.uuid4().hex}


def _on_this_machine(record: dict[str, Any]) -> bool:
    """Same host, boot and pid namespace: its pid means the same process here (unknown parts are not compared).

    A differing boot or namespace under the same hostname may be another machine or container (names
    repeat): its holder is judged by its heartbeat, never by a pid that means nothing here.
    """
    if record.get("host") != socket.gethostname():
        return False
    for key, ours in (("boot_id", _read("/proc/sys/kernel/random/boot_id")), ("pid_namespace", _pid_namespace())):
        if record.get(key) and ours and record[key] != ours:
            return False
    return True


def stale_reason(record: dict[str, Any], stale_seconds: float, now: datetime.datetime | None = None) -> str | None:
    """Why the lock of `record` is stale (rules (a) and (b) of the module docstring), or None if it is held."""
    now = now or _now()
    pid = record.get("pid")
    if _on_this_machine(record) and isinstance(pid, int):
        fields = _proc_stat(pid)
        if fields is None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"pid {pid} is gone"
            except PermissionError:
                pass  # alive, another user's
            return None
        if fields[0] in ("Z", "X"):
            return f"pid {pid} is gone (a zombie)"
        start = int(fields[22 - 3]) if len(fields) > 22 - 3 else None
        if record.get("pid_start") is not None and start is not None and start != record["pid_start"]:
            return f"pid {pid} is now another process"
        return None
    beat = _parse(record.get("heartbeat"))
    if beat is None:
        return "it has no readable heartbeat"
    age = (now - beat).total_seconds()
    if age > stale_seconds:
        return f"no heartbeat for {age:.0f} s (more than reliability.lock_stale_seconds={stale_seconds:g})"
    return None


def describe(record: dict[str, Any], now: datetime.datetime | None = None) -> str:
    """'pid 1234 on host h (running since ..., last heartbeat 12 s ago)'."""
    beat = _parse(record.get("heartbeat"))
    ago = f"{max(0, round(((now or _now()) - beat).total_seconds()))} s ago" if beat else "unknown"
    return (f"pid {record.get('pid')} on host {record.get('host')} (running since {record.get('started')}, "
            f"last heartbeat {ago})")


# ----------------------------------------------------------------------------- the lock


def _stat(path: str) -> tuple[str, float]:
    """(identity of the file at `path`, its mtime); a bucket object has no inode, its mtime stands for it."""
    if storage.is_remote(path):
        mtime = storage.mtime(path)
        return f"object-{mtime:.0f}", mtime
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_mtime_ns}", st.st_mtime


class WorkdirLock:
    """`<workdir>/lock.json`, held from `acquire()` to `release()` (or as a context manager)."""

    def __init__(self, workdir: str, heartbeat_seconds: float = 30, stale_seconds: float = 300):
        if not 0 < heartbeat_seconds < stale_seconds:
            raise ValueError(f"reliability.lock_heartbeat_seconds={heartbeat_seconds} must be > 0 and less than "
                             f"reliability.lock_stale_seconds={stale_seconds}")
        self.workdir = storage.resolve(workdir)  # absolute, or a bucket URL (gs://) as given
        self.path = os.path.join(self.workdir, LOCK)
        self.heartbeat_seconds, self.stale_seconds = float(heartbeat_seconds), float(stale_seconds)
        self.record: dict[str, Any] | None = None  # ours, while held
        self.lost: str | None = None  # why we no longer hold it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # heartbeat writes vs release

    # ------------------------------------------------------------- acquiring

    def acquire(self, timeout: float = 10.0) -> WorkdirLock:
        """Takes the lock, taking over a stale one; raises WorkdirInUseError if another run holds it.

        `timeout` bounds only the waits for another contender's takeover or
        creation of the file in progress (milliseconds, normally).
        """
        try:
            storage.makedirs(self.workdir)
        except OSError as e:
            raise OSError(f"--workdir={self.workdir}: not writable ({e.strerror or e})") from None
        deadline = time.monotonic() + timeout
        while True:
            if self._create():
                break
            found = self._inspect()
            if found is None:
                continue  # released meanwhile: try again
            identity, record, age = found
            if record is None:
                reason = (f"an unreadable lock file {age:.0f} s old (its creator died while writing it)"
                          if age > _WRITE_GRACE_SECONDS else None)
                if reason is None:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)  # its creator is writing it
                        continue
                    raise WorkdirInUseError(f"--workdir={self.workdir} is in use: {self.path} is being written by "
                                            "another run; wait for it, or stop it")
            else:
                reason = stale_reason(record, self.stale_seconds)
                if reason is None:
                    raise WorkdirInUseError(
                        f"--workdir={self.workdir} is in use by {describe(record)}: wait for it, or stop it; a "
                        "lock left by a killed run is taken over automatically")
            if self._take_over(identity, deadline):
                logging.warning("%s: taking over the lock of %s: %s", self.path,
                                describe(record) if record else "an unknown run", reason)
            elif time.monotonic() > deadline:
                raise WorkdirInUseError(f"--workdir={self.workdir}: could not take over the stale lock {self.path} "
                                        f"({reason}); another run is taking it over")
            else:
                time.sleep(0.05)
        self._thread = threading.Thread(target=self._beat_forever, name=f"heartbeat of {self.path}", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _create(self) -> bool:
        record = holder_record()
        if storage.is_remote(self.path):
            return self._create_remote(record)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise OSError(f"--workdir={self.workdir}: not writable ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self.record, self.lost = record, None
        return True

    def _create_remote(self, record: dict[str, Any]) -> bool:
        """On a bucket (gs://), best effort: epath offers no O_EXCL (GCS's create-if-absent precondition,
        ifGenerationMatch=0, is not reachable through it), so two runs starting within the same second can
        both pass the check; a run that loses the file later stops at its next `check()` (the token differs)."""
        if storage.exists(self.path):
            return False
        atomic.write_json(self.path, record)
        self.record, self.lost = record, None
        return True

    def _inspect(self) -> tuple[str, dict[str, Any] | None, float] | None:
        """(identity of the file, its record or None if unreadable, its age in seconds), or None if absent."""
        try:
            identity, mtime = _stat(self.path)
            text = storage.read_text(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                record = None
        except ValueError:
            record = None
        return identity, record, time.time() - mtime

    def _identity(self) -> str | None:
        try:
            return _stat(self.path)[0]
        except FileNotFoundError:
            return None

    def _take_over(self, identity: str, deadline: float) -> bool:
        """Removes the stale lock file `identity` if this contender claims it first; returns whether it did."""
        if storage.is_remote(self.path):  # no O_EXCL claim on a bucket: best effort (see _create_remote)
            if self._identity() != identity:
                return False
            storage.remove(self.path)
            return True
        claim = f"{self.path}.takeover-{identity}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(claim).st_mtime > _TAKEOVER_GRACE_SECONDS:
                    raise WorkdirInUseError(f"{claim}: a takeover of the stale lock {self.path} was interrupted; "
                                            "delete that file if no other run is starting, then retry") from None
            return False
        try:
            if self._identity() != identity:
                return False  # taken over, released or refreshed meanwhile: look again
            aside = f"{self.path}.stale-{identity}"
            os.rename(self.path, aside)
            os.unlink(aside)
            return True
        except FileNotFoundError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(claim)

    # ------------------------------------------------------------- holding

    def _still_ours(self) -> dict[str, Any] | None:
        """The lock file's record if it is ours; else records why it is not (`self.lost`)."""
        found = self._inspect()
        record = found[1] if found else None
        if record is not None and self.record is not None and record.get("token") == self.record["token"]:
            return record
        self.lost = (f"{self.path} now names {describe(record)}" if record
                     else f"{self.path} was removed" if found is None else f"{self.path} was overwritten")
        return None

    def heartbeat(self) -> None:
        """Refreshes the heartbeat if the lock file is still ours.

        An atomic rewrite (umr_jax.atomic), whose slow part (writing and syncing the new file) comes
        before the check that the lock is still ours, so that only a rename follows the check.
        """
        with self._mutex:
            if self.record is None or self.lost:
                return
            record = {**self.record, "heartbeat": _iso(_now())}
            try:
                with atomic.atomic_open(self.path, "w") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if self._still_ours() is None:
                        raise _NotOursError  # the temporary file is removed, lock.json left alone
            except _NotOursError:
                logging.error("lost the workdir lock: %s", self.lost)
                return
            self.record = record

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except OSError as e:  # e.g. a network filesystem hiccup: try again at the next beat
                logging.warning("%s: heartbeat failed (%s)", self.path, e)
            if self.lost:
                return

    def check(self) -> None:
        """Raises WorkdirLockLostError if another run took the lock over (or it was removed)."""
        if self.lost:
            raise WorkdirLockLostError(f"--workdir={self.workdir}: this run no longer holds the lock: {self.lost}; "
                                       "stopped so that two runs do not write one workdir: let the other run "
                                       "finish, or stop it and re-run")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock file if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._mutex:
            if self.record is not None and not self.lost and self._still_ours() is not None:
                storage.remove(self.path)
            self.record = None
        atexit.unregister(self.release)

    def __enter__(self) -> WorkdirLock:
        return self.acquire() if self.record is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(workdir: str, reliability) -> WorkdirLock:
    """The lock of `workdir` with the heartbeat and staleness of a run config's `reliability` section."""
    return WorkdirLock(workdir, float(reliability.lock_heartbeat_seconds),
                       float(reliability.lock_stale_seconds)).acquire()

