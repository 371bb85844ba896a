"""The workdir on a real cluster: one run at a time (lock.json), and damaged run records end with one clear line.

Fast on purpose: the binary is run only where its error comes before any model work (about a second each),
everything else at the unit level (the lock, RunDir, the trainer's checkpoints).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, run_tiny, tiny_config
from umr_jax import atomic, distill, main, sharding, workdir_lock
from umr_jax.workdir import MANIFEST, MissingOutputError, RecordError, RunDir
from umr_jax.workdir_lock import WorkdirInUseError, WorkdirLock, WorkdirLockLostError


def _write_lock(workdir: pathlib.Path, record: dict) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record)
    (workdir / workdir_lock.LOCK).write_text(text)
    return text


def _ago(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The run's one error line; no traceback anywhere."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("umr_jax.main: error: ")]
    assert len(lines) == 1 and done.stderr.strip().splitlines()[-1] == lines[0], done.stderr[-3000:]
    return lines[0]


@pytest.fixture
def sleeper():
    """A live process on this host that is not us: the holder of someone else's lock."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- one run per workdir


def test_a_second_run_is_refused_with_one_line_naming_the_holder(tmp_path, sleeper):
    workdir = tmp_path / "run"
    held = _write_lock(workdir, workdir_lock.holder_record(sleeper.pid, started=_ago(3600), heartbeat=_ago(12)))
    line = _error_line(run_tiny(workdir))
    record = json.loads(held)
    assert re.fullmatch(
        re.escape(f"umr_jax.main: error: --workdir={workdir} is in use by pid {sleeper.pid} on host {record['host']} "
                  f"(running since {record['started']}, last heartbeat ") + r"1\d" +
        re.escape(" s ago): wait for it, or stop it; a lock left by a killed run is taken over automatically "
                  "(the traceback: --verbosity=1)"), line), line
    # Refused before it wrote anything: the holder's lock is untouched and alone.
    assert os.listdir(workdir) == [workdir_lock.LOCK] and (workdir / workdir_lock.LOCK).read_text() == held


def test_a_live_holder_is_never_taken_over_however_old_its_heartbeat(tmp_path, sleeper):
    _write_lock(tmp_path, workdir_lock.holder_record(sleeper.pid, heartbeat=_ago(10_000)))
    with pytest.raises(WorkdirInUseError, match=f"in use by pid {sleeper.pid} on host "):
        WorkdirLock(str(tmp_path)).acquire()


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, workdir_lock.holder_record(dead.pid))
    with caplog.at_level("WARNING"), WorkdirLock(str(tmp_path)) as lock:
        held = json.loads((tmp_path / workdir_lock.LOCK).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.record["token"]
        assert held["pid_start"] == workdir_lock.process_start_time(os.getpid())
    assert f"taking over the lock of pid {dead.pid} on host" in caplog.text and f"pid {dead.pid} is gone" in caplog.text
    assert os.listdir(tmp_path) == []  # released, and the stale file is gone too


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    record = workdir_lock.holder_record()  # our own pid, but another process's start time
    record["pid_start"] -= 1
    _write_lock(tmp_path, record)
    assert workdir_lock.stale_reason(record, 300) == f"pid {os.getpid()} is now another process"
    with WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["token"] == lock.record["token"]


def test_a_holder_on_another_host_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    fresh = workdir_lock.holder_record(4242, host="tpu-vm-7", heartbeat=_ago(120))
    _write_lock(tmp_path, fresh)
    with pytest.raises(WorkdirInUseError) as refused:
        WorkdirLock(str(tmp_path), stale_seconds=300).acquire()
    assert "is in use by pid 4242 on host tpu-vm-7 (running since " in str(refused.value)
    assert re.search(r"last heartbeat 12[012] s ago\): wait for it, or stop it", str(refused.value))
    _write_lock(tmp_path, workdir_lock.holder_record(4242, host="tpu-vm-7", heartbeat=_ago(301)))
    assert re.fullmatch(r"no heartbeat for 30[12] s \(more than reliability\.lock_stale_seconds=300\)",
                        workdir_lock.stale_reason(json.loads((tmp_path / workdir_lock.LOCK).read_text()), 300))
    with WorkdirLock(str(tmp_path), stale_seconds=300) as lock:
        assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["token"] == lock.record["token"]


def test_same_hostname_in_another_boot_or_container_is_judged_by_its_heartbeat(tmp_path):
    record = workdir_lock.holder_record(os.getpid())
    record["pid_namespace"] = "pid:[1]"  # the same hostname, another container: its pid means nothing here
    record["pid"] = 999_999_999
    assert workdir_lock.stale_reason(record, 300) is None
    record["heartbeat"] = workdir_lock._iso(_ago(400))
    assert re.match(r"no heartbeat for 40[01] s", workdir_lock.stale_reason(record, 300))


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_contenders_racing_for_a_workdir_exactly_one_wins(tmp_path, stale):
    """Eight threads at once, on a free workdir or on a dead run's lock: one holds it, seven are refused."""
    for attempt in range(3):
        workdir = tmp_path / str(attempt)
        if stale:
            dead = subprocess.Popen(["true"])
            dead.wait()
            _write_lock(workdir, workdir_lock.holder_record(dead.pid))
        start, results = threading.Barrier(8), []

        def contend(workdir=workdir, start=start, results=results):
            lock = WorkdirLock(str(workdir))
            start.wait()
            try:
                results.append(lock.acquire())
            except WorkdirInUseError as e:
                results.append(e)

        threads = [threading.Thread(target=contend) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if isinstance(r, WorkdirLock)]
        assert len(winners) == 1 and len(results) == 8, results
        assert json.loads((workdir / workdir_lock.LOCK).read_text())["token"] == winners[0].record["token"]
        assert all("in use by pid" in str(r) for r in results if r is not winners[0]), results
        winners[0].release()
        assert os.listdir(workdir) == []


RACER = """
import sys, time
from umr_jax import workdir_lock
workdir, start = sys.argv[1], float(sys.argv[2])
lock = workdir_lock.WorkdirLock(workdir)
time.sleep(max(0.0, start - time.time()))
try:
    lock.acquire()
except workdir_lock.WorkdirInUseError:
    print("refused")
    sys.exit()
print("won", flush=True)
time.sleep(2)  # hold it while the others look
lock.release()
"""


def test_of_processes_racing_over_a_dead_runs_lock_exactly_one_wins(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, workdir_lock.holder_record(dead.pid))
    start = time.time() + 3  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert sorted(out.strip() for out, _ in outputs) == ["refused", "refused", "refused", "won"], outputs
    assert os.listdir(tmp_path) == []


def test_the_heartbeat_refreshes_a_lock_that_is_ours(tmp_path):
    with WorkdirLock(str(tmp_path), heartbeat_seconds=0.05, stale_seconds=1):
        path = tmp_path / workdir_lock.LOCK
        record = json.loads(path.read_text())
        atomic.write_json(path, {**record, "heartbeat": workdir_lock._iso(_ago(100))})
        time.sleep(0.5)
        assert json.loads(path.read_text()) == {**record, "heartbeat": json.loads(path.read_text())["heartbeat"]}
        assert json.loads(path.read_text())["heartbeat"] >= workdir_lock._iso(_ago(5))


def test_a_lock_taken_over_meanwhile_is_left_alone_and_stops_the_run(tmp_path):
    with WorkdirLock(str(tmp_path), heartbeat_seconds=1000, stale_seconds=2000) as lock:  # beats by hand here
        path = tmp_path / workdir_lock.LOCK
        lock.heartbeat()
        lock.check()
        other = workdir_lock.holder_record(4242, host="elsewhere")  # e.g. our heartbeat stalled past the limit
        atomic.write_json(path, other)
        lock.heartbeat()
        assert json.loads(path.read_text()) == other  # never overwritten ...
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        with pytest.raises(WorkdirLockLostError, match=r"no longer holds the lock: .*/lock.json now names pid 4242 on "
                                                        r"host elsewhere \(.*\); stopped so that two runs do not "
                                                        r"write one workdir"):
            lock.check()  # ... and the run stops before its next stage
    assert json.loads(path.read_text()) == other  # nor deleted


def test_the_lock_is_released_however_the_run_ends(tmp_path):
    # A failing stage (here: a recorded stage whose outputs are gone, see below) ...
    _recorded_workdir(tmp_path, {"round-0/encode": 1})
    with pytest.raises(MissingOutputError):
        main.run(tiny_config(), str(tmp_path))
    assert not (tmp_path / workdir_lock.LOCK).exists()
    # ... setting up the run after the lock was taken (here: another run's config) ...
    other = tiny_config()
    other.seed = 1
    with pytest.raises(ValueError, match="another config"):
        main.Run(other, str(tmp_path))
    assert not (tmp_path / workdir_lock.LOCK).exists()
    # ... any exception under the lock.
    with pytest.raises(RuntimeError), WorkdirLock(str(tmp_path)):
        raise RuntimeError
    assert not (tmp_path / workdir_lock.LOCK).exists()


def test_lock_timings_must_leave_room_for_a_heartbeat(tmp_path):
    cfg = tiny_config()
    cfg.reliability.lock_stale_seconds = 30
    with pytest.raises(ValueError, match=re.escape("lock_heartbeat_seconds=30.0 must be > 0 and less than "
                                                   "reliability.lock_stale_seconds=30.0")):
        workdir_lock.acquire(str(tmp_path), cfg.reliability)


# ----------------------------------------------------------------------------- damaged run records


def _recorded_workdir(workdir: pathlib.Path, stages: dict | None = None) -> RunDir:
    """A workdir as configs/tiny.py leaves it: its config.json and a manifest of `stages`."""
    run_dir = RunDir(str(workdir), tiny_config())
    for name in stages or {}:
        run_dir.record(name, 1.0)
    return run_dir


@pytest.mark.parametrize("record", ["manifest.json", "config.json"])
def test_a_truncated_record_is_one_line_naming_it_and_what_to_do(tmp_path, record):
    workdir = tmp_path / "run"
    _recorded_workdir(workdir, {"round-0/encode": 1})
    path = workdir / record
    path.write_text(path.read_text()[:100])  # the first 100 bytes
    line = _error_line(run_tiny(workdir))
    assert re.match(re.escape(f"umr_jax.main: error: {path}: not valid JSON (") + r"[^()]+\(char \d+\)\), ", line), line
    what_to_do = ("delete it to run the stages again (committed chunks, indexes and checkpoints are reused), or use "
                  "a new --workdir" if record == MANIFEST else
                  "it records the config this workdir was run with: restore it, or delete it if you resume with the "
                  "same config, or use a new --workdir")
    assert line.endswith(f"truncated or edited: {what_to_do} (the traceback: --verbosity=1)"), line
    assert not (workdir / workdir_lock.LOCK).exists()  # released


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "expected {\"stages\": {stage: entry}}, found list: delete it to run the stages again"),
    (lambda m: {"stages": list(m["stages"])}, "expected {\"stages\": {stage: entry}}, found 'stages' is list"),
    (lambda m: {"stages": {"round-0/encode": {"seconds": 1.0}}},
     "the entry of stage 'round-0/encode' is not one this program writes (it needs 'finished' and 'seconds'; found "
     "{\"seconds\": 1.0}): delete the entry to redo the stage, or use a new --workdir"),
    (lambda m: {"stages": {"round-0/encode": "done"}}, "the entry of stage 'round-0/encode' is not one"),
    (lambda m: {"stages": {"round-0/encode": {"finished": "2026-11-30T07:00:00+00:00", "seconds": "1"}}},
     "the entry of stage 'round-0/encode' is not one"),
])
def test_a_manifest_edited_into_another_shape_is_named(tmp_path, edit, message):
    _recorded_workdir(tmp_path, {"round-0/encode": 1})
    path = tmp_path / MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(RecordError) as error:
        RunDir(str(tmp_path), tiny_config())
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object (a config), found list: it records the config"),
    (b"\xff\xfe{", "not valid JSON (not UTF-8 text): it records the config"),
    ("", "not valid JSON (Expecting value: line 1 column 1 (char 0)), truncated or edited"),
])
def test_a_damaged_config_record_is_named(tmp_path, content, message):
    _recorded_workdir(tmp_path)
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RecordError) as error:
        RunDir(str(tmp_path), tiny_config())
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)


def test_a_stage_recorded_done_is_skipped_only_with_its_outputs(tmp_path):
    run_dir = _recorded_workdir(tmp_path, {"round-0/evaluate": 1, "round-0/encode": 1})

    def never():
        raise AssertionError("a recorded stage ran")

    with pytest.raises(MissingOutputError) as error:
        run_dir.stage("round-0/evaluate", never, outputs=["round-0/metrics.json"])
    assert str(error.value) == (f"{tmp_path}/manifest.json records stage round-0/evaluate as done but "
                                f"{tmp_path}/round-0/metrics.json is missing: delete the stage's entry from "
                                "manifest.json to redo it, or use a new --workdir")
    (tmp_path / "round-0").mkdir()
    (tmp_path / "round-0" / "metrics.json").write_text("{}")
    assert run_dir.stage("round-0/evaluate", never, outputs=["round-0/metrics.json"]) is False
    with pytest.raises(MissingOutputError, match=r"round-0/encode as done but .*/b is missing \(and 1 more\)"):
        run_dir.stage("round-0/encode", never, outputs=lambda: ["round-0/metrics.json", "b", str(tmp_path / "c")])
    assert run_dir.stage("round-1/encode", lambda: {"n": 1}, outputs=["nothing-yet"]) is True  # not recorded: runs


def test_the_run_names_a_recorded_stage_whose_outputs_are_gone(tmp_path):
    """Encoding is recorded but its chunks are not there: one line, not the index stage failing on them.

    (Once the index stage is done too, the embeddings may go: nothing reads them again.)"""
    _recorded_workdir(tmp_path, {"round-0/encode": 1})
    with pytest.raises(MissingOutputError) as error:  # a FileNotFoundError: the binary's one line
        main.run(tiny_config(), str(tmp_path))
    assert str(error.value) == (f"{tmp_path}/manifest.json records stage round-0/encode as done but "
                                f"{tmp_path}/round-0/embeddings/done-0-of-1.json is missing: delete the stage's entry "
                                "from manifest.json to redo it, or use a new --workdir")


def test_an_embedding_store_and_an_index_name_the_files_they_need(tmp_path):
    from umr_jax import encode, search
    from umr_jax.data.readers import ReadReport

    store = encode.EmbeddingStore(str(tmp_path / "emb"))
    assert store.expected_files() == [str(tmp_path / "emb" / "done-0-of-1.json")]
    for p in range(2):
        store.mark_done(p, 2, 3, ReadReport("x"))
    assert store.expected_files()[:2] == [str(tmp_path / "emb" / f"done-{p}-of-2.json") for p in range(2)]
    assert str(tmp_path / "emb" / "chunk-000002.ids.txt") in store.expected_files()
    assert len(store.expected_files()) == 2 + 3 * 3
    assert search.saved_index_files(str(tmp_path / "index")) == [str(tmp_path / "index" / "index.json")]
    (tmp_path / "index" / "shard-1-of-2").mkdir(parents=True)
    assert search.saved_index_files(str(tmp_path / "index")) == [
        str(tmp_path / "index" / f"shard-{p}-of-2" / "index.json") for p in range(2)]


# ----------------------------------------------------------------------------- checkpoints of another setup


def _checkpoint(directory: str, cfg, model, seed: int, total: int = 3, step: int = 3) -> distill.Trainer:
    """Writes one Orbax step (no training: a step needs no compilation) as a training run would."""
    trainer = distill.Trainer(model, cfg, sharding.make_mesh((-1, 1)), total, seed)
    manager = distill.checkpoint_manager(directory, cfg)
    trainer.save(manager, step)
    manager.close()
    return trainer


def _bigger_dual_encoder():
    from flax import nnx

    from helpers import TINY
    from umr_jax.models.bert import BertConfig, BertEncoder, DualEncoder

    config = BertConfig(**{**TINY, "intermediate_size": 48})
    return DualEncoder(*[BertEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(params=0, dropout=i))
                         for i in range(2)])


def test_checkpoints_of_another_setup_are_refused_by_name(tmp_path):
    from test_distill import tiny_config as train_config
    from test_distill import tiny_dual_encoder

    cfg, mesh, directory = train_config(), sharding.make_mesh((-1, 1)), str(tmp_path / "round-1" / "checkpoints")
    _checkpoint(directory, cfg, tiny_dual_encoder(), seed=1001)
    saved = json.loads((tmp_path / "round-1" / "checkpoints" / distill.CHECKPOINT_FINGERPRINT).read_text())
    assert saved["seed"] == 1001 and saved["total_steps"] == 3 and len(saved["hash"]) == 16
    # The same setup restores (round 1's final weights) ...
    distill.restore_final(tiny_dual_encoder(), cfg, mesh, directory, num_queries=8, seed=1001)
    what_to_do = (f"delete {directory} (and, if manifest.json records its training stage as done, that entry) to "
                  "train again, or use a new --workdir")
    # ... round 1's checkpoints copied into round 2 (another seed) do not,
    with pytest.raises(distill.CheckpointMismatchError) as error:
        distill.restore_final(tiny_dual_encoder(), cfg, mesh, directory, num_queries=8, seed=2001)
    assert str(error.value) == (f"{directory}: these checkpoints were written for another training setup "
                                f"(seed: 1001 -> 2001): {what_to_do}")
    # ... nor into a model of other shapes or a changed train config (resuming training, or at the end).
    trainer = distill.Trainer(_bigger_dual_encoder(), cfg, mesh, 3, 1001)
    with pytest.raises(distill.CheckpointMismatchError, match=r"these checkpoints were written for another "
                       r"training setup \(\d+ parameters differ, e\.g\. passage/layers/0/ffn/\w+: float32\[.*64\] -> "
                       r"float32\[.*48\]\): delete "):
        trainer.restore(distill.checkpoint_manager(directory, cfg), 3)
    other = train_config(learning_rate=5e-4)
    with pytest.raises(distill.CheckpointMismatchError, match=r"\(train\.learning_rate: 0\.001 -> 0\.0005\)"):
        distill.restore_final(tiny_dual_encoder(), other, mesh, directory, num_queries=8, seed=1001)


def test_an_orbax_restore_error_is_one_line_naming_the_directory(tmp_path):
    """Checkpoints without a fingerprint (an older version, or it was deleted): Orbax's own error, made one line."""
    from test_distill import tiny_config as train_config
    from test_distill import tiny_dual_encoder

    cfg, mesh, directory = train_config(), sharding.make_mesh((-1, 1)), str(tmp_path)
    _checkpoint(directory, cfg, tiny_dual_encoder(), seed=0)
    os.unlink(tmp_path / distill.CHECKPOINT_FINGERPRINT)
    with pytest.raises(distill.CheckpointMismatchError) as error:
        distill.restore_final(_bigger_dual_encoder(), cfg, mesh, directory, num_queries=8, seed=0)
    message = str(error.value)
    assert re.match(re.escape(f"{directory}: step 3 does not fit this model (") + r"\d+ arrays differ, e\.g\. "
                    r"opt_state/1/0/mu/passage/layers/0/ffn/\w+/value: stored float32\[.*64\], this model "
                    r"float32\[.*48\]\)", message), message
    assert message.endswith(f"): delete {directory} (and, if manifest.json records its training stage as done, "
                            "that entry) to train again, or use a new --workdir"), message
    # A final step that is not there says so, and what to do.
    with pytest.raises(FileNotFoundError, match=r"expected the final checkpoint at step 6, found step 3: delete "):
        distill.restore_final(tiny_dual_encoder(), cfg, mesh, directory, num_queries=16, seed=0)
