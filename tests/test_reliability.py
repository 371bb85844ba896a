"""Reliability: kill -9 in every stage, corrupt state, bad input, numeric and resource faults."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from helpers import assert_same_result, recorded_stages, run_kill_chain, run_tiny
from umr_jax import atomic
from umr_jax.data.readers import InputError, iter_passage_chunks, read_queries_jsonl

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "umr_jax"


# The order in which one run reaches the points: each re-run resumes and dies at the next one.
KILL_CHAIN = [
    ("encode.chunk_committed", "round-0/encode"),
    ("index.built", "round-0/index"),
    ("retrieve.dev_written", "round-0/retrieve"),
    ("evaluate.metrics_written", "round-0/evaluate"),
    ("teacher.chunk_committed", "round-1/teacher"),
    ("train.checkpoint_saved", "round-1/train"),
    ("export.query_written", "export"),
]


def test_kill_9_in_every_stage_then_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    marks = run_kill_chain(workdir, KILL_CHAIN, lambda env: run_tiny(workdir, env=env))
    done = run_tiny(workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = recorded_stages(workdir)
    # Partial progress inside the killed stages was kept, not redone.
    assert (workdir / "round-0/embeddings/chunk-000000.json").stat().st_mtime_ns == marks["chunk"]
    assert (workdir / "round-1/teacher/chunk-000000.npy").stat().st_mtime_ns == marks["teacher"]
    assert stages["round-1/train"]["info"]["resumed_at"] == 2
    # ... and the result is the uninterrupted run's, bit for bit.
    assert_same_result(workdir, tiny_run)


# ----------------------------------------------------------------------------- corrupt state


def test_a_checkpoint_without_its_commit_is_ignored(tmp_path):
    """Orbax writes a step under a temporary name and renames it when whole; a leftover is never restored."""
    from test_distill import tiny_config, tiny_dual_encoder, toy_data

    from umr_jax import distill, sharding

    cfg = tiny_config()
    mesh = sharding.make_mesh((-1, 1))
    distill.train(tiny_dual_encoder(), toy_data(), cfg, mesh, str(tmp_path), seed=0, pad_id=0, stop_at=2)
    half = tmp_path / "3.orbax-checkpoint-tmp-1234"
    (half / "default").mkdir(parents=True)
    (half / "default" / "garbage").write_bytes(b"\0" * 100)
    assert distill.checkpoint_manager(str(tmp_path), cfg).latest_step() == 2
    summary = distill.train(tiny_dual_encoder(), toy_data(), cfg, mesh, str(tmp_path), seed=0, pad_id=0)
    assert summary["resumed_at"] == 2


def test_the_temporary_directory_of_a_killed_writer_is_swept_by_the_next_sole_writer(tmp_path):
    """A run killed while exporting a tower or saving an index leaves `<dir>.tmp-*` (a whole model or index)."""
    export = tmp_path / "export"
    left = export / "passage.tmp-killed"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(b"\0" * 64)
    (export / "passage2.tmp-other").mkdir()  # another directory's: not swept

    def write(directory: str) -> None:
        pathlib.Path(directory, "config.json").write_text("{}")

    atomic.replace_dir(export / "passage", write, sole_writer=True)
    assert sorted(p.name for p in export.iterdir()) == ["passage", "passage2.tmp-other"]
    assert [p.name for p in (export / "passage").iterdir()] == ["config.json"]
    (export / "passage.tmp-busy").mkdir()  # a shared cache: another run may be writing it right now
    atomic.replace_dir(export / "passage", write)
    assert (export / "passage.tmp-busy").is_dir()


# ----------------------------------------------------------------------------- bad input, property-based

SAFE_TEXT = st.text(st.characters(blacklist_characters='\t\n\r"\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029',
                                  blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
BAD_LINES = {
    "missing column": lambda i, t: f"p{i}\t{t}".encode(),
    "extra column": lambda i, t: f"p{i}\t{t}\tT\textra".encode(),
    "empty text": lambda i, t: f"p{i}\t \tT".encode(),
    "invalid UTF-8": lambda i, t: f"p{i}\t{t}".encode() + b"\xff\xfe\tT",
    "enormous": lambda i, t: f"p{i}\t{'x' * 2000}\tT".encode(),
    "duplicate id": lambda i, t: f"p{i - 1}\t{t}\tT".encode(),
}
LINE = st.one_of(st.tuples(st.just("ok"), SAFE_TEXT), st.tuples(st.sampled_from(sorted(BAD_LINES)), SAFE_TEXT))


def _tsv(kinds_and_texts) -> tuple[bytes, list[str | None]]:
    """The file, and per data line the id the reader must accept (None = must reject)."""
    lines, accepted, seen = [b"id\ttext\ttitle"], [], set()
    for i, (kind, text) in enumerate(kinds_and_texts):
        if kind == "duplicate id" and i == 0:
            kind = "ok"
        lines.append(f"p{i}\t{text}\tT".encode() if kind == "ok" else BAD_LINES[kind](i, text))
        pid = {"ok": f"p{i}", "duplicate id": f"p{i - 1}"}.get(kind)
        # A "duplicate" of a line that was itself rejected is a first use of that id.
        accepted.append(pid if pid is not None and pid not in seen else None)
        if accepted[-1]:
            seen.add(pid)
    return b"\n".join(lines) + b"\n", accepted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, min_size=1, max_size=12), st.integers(1, 5))
def test_tsv_reader_classifies_every_line(tmp_path, lines, chunk_size):
    content, accepted = _tsv(lines)
    path = tmp_path / "corpus.tsv"
    path.write_bytes(content)
    read = used = skipped = 0
    passages = []
    for _, chunk, report in iter_passage_chunks(path, chunk_size, on_error="skip", max_line_bytes=1000):
        read, used, skipped = read + report.read, used + report.used, skipped + report.num_skipped
        passages += chunk
    assert read == len(lines) and read == used + skipped  # nothing silently lost
    assert [p.id for p in passages] == [pid for pid in accepted if pid]
    first_bad = next((i for i, pid in enumerate(accepted) if pid is None), None)
    if first_bad is None:
        assert len(list(iter_passage_chunks(path, chunk_size, max_line_bytes=1000))) >= 1
    else:
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:{first_bad + 2}: "):
            list(iter_passage_chunks(path, chunk_size, max_line_bytes=1000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_tsv_reader_on_random_bytes_never_crashes_raw(tmp_path, content):
    path = tmp_path / "random.tsv"
    path.write_bytes(content)
    try:
        chunks = list(iter_passage_chunks(path, 3, on_error="skip"))
    except InputError as e:  # only the header line can still be fatal
        assert e.path == str(path) and e.line == 1
        return
    total_read = sum(r.read for _, _, r in chunks)
    assert total_read == sum(r.used + r.num_skipped for _, _, r in chunks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=60),
                          st.builds(lambda i, t: json.dumps({"id": f"q{i}", "text": t, "lang": "de"}).encode(),
                                    st.integers(0, 5), SAFE_TEXT)), max_size=10))
def test_query_reader_counts_or_names_every_line(tmp_path, lines):
    path = tmp_path / "queries.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    queries, report = read_queries_jsonl(path, on_error="skip")
    records = sum(1 for line in lines if line.replace(b"\n", b" ").strip())
    assert report.read == records == report.used + report.num_skipped
    assert len(queries) == report.used and len({q.id for q in queries}) == len(queries)
    if report.num_skipped:
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:\d+: "):
            read_queries_jsonl(path)


# ----------------------------------------------------------------------------- resource faults


def test_no_space_left_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    from umr_jax.data.readers import ReadReport
    from umr_jax.encode import EmbeddingStore

    store = EmbeddingStore(str(tmp_path))
    real_write = atomic.write_json

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_json", full_disk)  # the commit marker cannot be written
    with pytest.raises(OSError, match="No space left"):
        store.write_chunk(0, ["a", "b"], np.ones((2, 4), np.float32), ReadReport("x", 2, 2))
    monkeypatch.setattr(atomic, "write_json", real_write)
    assert store.valid_chunks() == set()  # data without its marker is not a chunk
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    def fail_midway(f, array, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", fail_midway)
    with pytest.raises(OSError):
        atomic.save_npy(tmp_path / "scores.npy", np.zeros(3, np.float32))
    assert not (tmp_path / "scores.npy").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_an_unwritable_workdir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/umr-jax-cannot-write-here"  # root ignores permission bits; /proc refuses everyone
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    done = run_tiny(pathlib.Path(target))
    assert done.returncode != 0
    assert f"--workdir={target}: not writable" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- security


def test_nothing_unpickles_untrusted_files():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport pickle\b|\bpickle\.|\bdill\b|\bcloudpickle\b", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
