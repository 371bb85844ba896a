"""Corpus and query readers: streaming chunks, shards, and bad input that is never silent."""

import json

import pytest

from helpers import read_passages
from umr_jax.data.readers import InputError, iter_passage_chunks, lookup_passages, read_queries_jsonl


def _tsv(tmp_path, rows, header="id\ttext\ttitle", name="corpus.tsv"):
    path = tmp_path / name
    body = b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in rows)
    path.write_bytes(((header + "\n").encode() if header else b"") + body)
    return path


def test_dpr_tsv_quoting_and_header(tmp_path):
    path = _tsv(tmp_path, ['1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron', "2\tplain text\t"])
    passages, report = read_passages(path)
    assert [(p.id, p.text, p.title) for p in passages] == [
        ("1", 'Aaron ( or ; "Ahärôn") is a prophet', "Aaron"), ("2", "plain text", "")]
    assert (report.read, report.used, report.num_skipped) == (2, 2, 0)


def test_header_order_and_headerless_files(tmp_path):
    reordered = _tsv(tmp_path, ["T\tbody\tx7"], header="title\ttext\tid", name="a.tsv")
    assert read_passages(reordered)[0][0].id == "x7"
    headerless = _tsv(tmp_path, ["p1\tbody\tT"], header="", name="b.tsv")
    assert [(p.id, p.title) for p in read_passages(headerless)[0]] == [("p1", "T")]


def test_chunks_are_fixed_by_line_number_and_split_across_shards(tmp_path):
    path = _tsv(tmp_path, [f"{i}\ttext {i}\tt" for i in range(10)])
    chunks = {c: [p.id for p in ps] for c, ps, _ in iter_passage_chunks(path, 3)}
    assert chunks == {0: ["0", "1", "2"], 1: ["3", "4", "5"], 2: ["6", "7", "8"], 3: ["9"]}
    shard1 = {c: [p.id for p in ps] for c, ps, _ in iter_passage_chunks(path, 3, shard_index=1, num_shards=2)}
    assert shard1 == {1: chunks[1], 3: chunks[3]}
    resumed = [c for c, _, _ in iter_passage_chunks(path, 3, skip_chunks={0, 2})]
    assert resumed == [1, 3]
    exact = [c for c, _, _ in iter_passage_chunks(_tsv(tmp_path, [f"{i}\tx\tt" for i in range(6)], name="e.tsv"), 3)]
    assert exact == [0, 1]  # no empty trailing chunk when the file ends on a boundary


BAD_LINES = [
    (b"2\tonly two columns", "wrong column count"),
    (b"2\ttoo\tmany\tcolumns", "wrong column count"),
    (b"2\t\ttitle", "empty text"),
    (b"\ttext\ttitle", "empty id"),
    (b"1\tsame id again\tt", "duplicate id"),
    (b"2\tbad \xff\xfe bytes\tt", "invalid UTF-8"),
    (b'2\t"unterminated \tt', "malformed TSV"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_tsv_line_raises_with_file_and_line(tmp_path, line, reason):
    path = _tsv(tmp_path, [b"1\tfirst\tt", b"3\tfine\tt", line])
    with pytest.raises(InputError, match=reason) as info:
        read_passages(path)
    assert (info.value.path, info.value.line) == (str(path), 4)
    assert f"{path}:4" in str(info.value)


def test_skip_mode_counts_every_bad_line(tmp_path):
    path = _tsv(tmp_path, [b"1\tfirst\tt"] + [line for line, _ in BAD_LINES] + [b"9\tlast\tt"])
    passages, report = read_passages(path, on_error="skip")
    assert [p.id for p in passages] == ["1", "9"]
    assert report.read == report.used + report.num_skipped == len(BAD_LINES) + 2
    assert report.skipped["wrong column count"] == 2 and report.skipped["invalid UTF-8"] == 1
    assert "skipped 7" in report.summary()


def test_enormous_line_is_rejected(tmp_path):
    path = _tsv(tmp_path, ["1\t" + "x" * 5000 + "\tt"])
    with pytest.raises(InputError, match="line too long"):
        read_passages(path, max_line_bytes=1000)


def test_queries_jsonl_normalises_language_and_reads_xor_fields(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"id": "a", "question": "ما هو؟", "lang": " ar", "answers": ["x"]},
            {"id": "b", "text": "Wer?", "lang": "DE"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    queries, report = read_queries_jsonl(path)
    assert [(q.id, q.text, q.lang) for q in queries] == [("a", "ما هو؟", "ar"), ("b", "Wer?", "de")]
    assert report.used == 2


@pytest.mark.parametrize(("record", "reason"), [
    ('{"id": "b", "lang": "en"}', r"missing field: text\|question"),
    ('{"id": "b", "text": "  ", "lang": "en"}', "empty text"),
    ('{"id": "a", "text": "again", "lang": "en"}', "duplicate id"),
    ('{"id": "b", "text": "q", "lang": "xx-unknown"}', "bad language"),
    ('{"id": "b", "text": "q"', "malformed JSON"),
    ('["a", "list"]', "malformed JSON"),
])
def test_bad_query_lines(tmp_path, record, reason):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "text": "fine", "lang": "en"}\n' + record + "\n")
    with pytest.raises(InputError, match=reason) as info:
        read_queries_jsonl(path)
    assert info.value.line == 2
    queries, report = read_queries_jsonl(path, on_error="skip")
    assert [q.id for q in queries] == ["a"] and report.num_skipped == 1


def test_missing_file_and_bad_policy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv"):
        read_passages(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="on_error"):
        read_passages(_tsv(tmp_path, ["1\tx\tt"]), on_error="ignore")


def test_lookup_passages_streams_only_the_wanted_ids(tmp_path):
    path = _tsv(tmp_path, [f"{i}\ttext {i}\tt" for i in range(100)])
    found = lookup_passages(path, ["7", "93"])
    assert {k: v.text for k, v in found.items()} == {"7": "text 7", "93": "text 93"}
    with pytest.raises(KeyError, match="1 passage ids not in the corpus"):
        lookup_passages(path, ["7", "x"])
