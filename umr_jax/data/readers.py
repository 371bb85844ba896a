"""Streaming readers for passage corpora (DPR TSV, BEIR JSONL), query files (JSONL) and qrels.

A paper-scale corpus has 21 million passages (13 GB), so nothing here loads a
file whole: passages stream line by line, grouped into fixed chunks of raw
lines. Chunk boundaries depend only on line numbers, never on which lines were
skipped, so chunk `c` is the same set of lines in every run and every process:
that is what makes corpus encoding resumable and shardable across JAX
processes. Bad input never disappears silently: per `on_error` it raises an
:class:`InputError` naming the file and line, or it is counted by reason in a
:class:`ReadReport` that the caller logs and reports at the end.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
from absl import logging

from umr_jax.data.languages import normalize_language_code

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")
TSV_COLUMNS = ("id", "text", "title")
# A line longer than this is treated as corrupt input rather than parsed.
DEFAULT_MAX_LINE_BYTES = 1 << 20


class InputError(ValueError):
    """Bad input, with the file and 1-based line it came from."""

    def __init__(self, path: str, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""
    lang: str = ""  # '' = unknown (DPR TSV has no language column)
    # Byte offset of the passage's line in its corpus file (-1: not from a file), so that a later stage
    # can seek to the few passages it needs instead of reading the corpus again (see PassageOffsets).
    offset: int = dataclasses.field(default=-1, compare=False)


@dataclasses.dataclass(frozen=True)
class Query:
    id: str
    text: str
    lang: str


@dataclasses.dataclass
class ReadReport:
    """What a reader saw: records read, used, and skipped per reason."""

    source: str
    read: int = 0
    used: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def reject(self, error: InputError, on_error: OnError) -> None:
        if on_error == "raise":
            raise error
        self.skipped[error.reason.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))
            logging.warning("skipping bad input: %s", error)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadReport) -> None:
        self.read += other.read
        self.used += other.used
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])

    def to_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "used": self.used,
                "skipped": dict(self.skipped), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> ReadReport:
        return cls(d["source"], d["read"], d["used"], collections.Counter(d["skipped"]), list(d["examples"]))

    def summary(self) -> str:
        text = f"{self.source}: read {self.read}, used {self.used}, skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        return text


def check_on_error(on_error: str) -> OnError:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


def _open_binary(path: str | os.PathLike):
    """The file, decompressed on the fly for a `.gz` name (BEIR-style corpora often ship gzipped)."""
    try:
        return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def _decode(raw: bytes, path: str, line_no: int, max_line_bytes: int) -> str:
    if len(raw) > max_line_bytes:
        raise InputError(path, line_no, f"line too long: {len(raw)} bytes (limit {max_line_bytes})")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(path, line_no, f"invalid UTF-8: byte {e.start}") from None


class _TsvLayout:
    """Column order from the header line (DPR files start with `id text title`)."""

    def __init__(self, first_fields: list[str]):
        self.has_header = {"id", "text"} <= set(first_fields)
        names = first_fields if self.has_header else list(TSV_COLUMNS)
        missing = [c for c in ("id", "text") if c not in names]
        if missing:
            raise ValueError(f"TSV header {names} lacks columns {missing}; expected {TSV_COLUMNS}")
        self.width = len(names)
        self.index = {name: names.index(name) for name in TSV_COLUMNS if name in names}


def _parse_tsv(text: str, layout: _TsvLayout, path: str, line_no: int, offset: int) -> Passage:
    try:
        fields = next(csv.reader([text], delimiter="\t", strict=True))
    except (csv.Error, StopIteration) as e:
        raise InputError(path, line_no, f"malformed TSV: {e}") from None
    if len(fields) != layout.width:
        raise InputError(path, line_no, f"wrong column count: expected {layout.width} tab-separated "
                                        f"columns, got {len(fields)}")
    pid = fields[layout.index["id"]].strip()
    body = fields[layout.index["text"]].strip()
    title = fields[layout.index["title"]].strip() if "title" in layout.index else ""
    if not pid:
        raise InputError(path, line_no, "empty id")
    if not body:
        raise InputError(path, line_no, f"empty text: passage {pid!r}")
    return Passage(pid, body, title, offset=offset)


def corpus_format(path: str | os.PathLike) -> str:
    """'jsonl' (BEIR's corpus.jsonl: one object per line) or 'tsv' (DPR), by the file name (.gz aside)."""
    return "jsonl" if str(path).removesuffix(".gz").endswith(".jsonl") else "tsv"


def _json_object(text: str, path: str, line_no: int) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, line_no, f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise InputError(path, line_no, f"malformed JSON: expected an object, got {type(record).__name__}")
    return record


LANGUAGE_FIELDS = ("lang", "language")
PASSAGE_ID_FIELDS = ("_id", "id", "docid")  # BEIR, DPR-style JSONL, MIRACL / Mr. TyDi
QUERY_ID_FIELDS = ("id", "_id", "query_id", "qid")


def _record_language(record: dict, path: str, line_no: int, default: str) -> str:
    """The record's `lang`/`language`, top-level or in BEIR's `metadata`; `default` when it has none."""
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    value = next((src[f] for src in (record, meta) for f in LANGUAGE_FIELDS if src.get(f) not in (None, "")), None)
    if value is None:
        return default
    try:
        return normalize_language_code(str(value), source=f"{path}:{line_no}")
    except ValueError as e:
        raise InputError(path, line_no, f"bad language: {e}") from None


def _parse_beir_passage(text: str, path: str, line_no: int, offset: int) -> Passage:
    """A BEIR corpus line: `_id` (or `id`, `docid`), `text`, optional `title` and language."""
    record = _json_object(text, path, line_no)
    key = next((k for k in PASSAGE_ID_FIELDS if k in record), None)
    if key is None or "text" not in record:
        missing = [name for name, ok in (("_id", key is not None), ("text", "text" in record)) if not ok]
        raise InputError(path, line_no, f"missing field: {', '.join(missing)}")
    pid = str(record[key]).strip()
    body = record["text"].strip() if isinstance(record["text"], str) else ""
    title = record.get("title") or ""
    if not pid:
        raise InputError(path, line_no, "empty id")
    if not body:
        raise InputError(path, line_no, f"empty text: passage {pid!r}")
    if not isinstance(title, str):
        raise InputError(path, line_no, f"bad title: passage {pid!r} has a {type(title).__name__}, not a string")
    return Passage(pid, body, title.strip(), _record_language(record, path, line_no, ""), offset)


def _corpus_parser(f, path: str, max_line_bytes: int) -> tuple[Callable[[str, int, int], Passage], int]:
    """The line parser of an open corpus file, `parse(text, line_no, byte_offset)`, and the number of header
    lines it consumed."""
    if corpus_format(path) == "jsonl":
        return (lambda text, line_no, offset: _parse_beir_passage(text, path, line_no, offset)), 0
    first = f.readline()
    try:
        layout = _TsvLayout(next(csv.reader([_decode(first, path, 1, max_line_bytes)], delimiter="\t")))
    except (csv.Error, StopIteration, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(path, 1, f"malformed TSV header: {e}") from None
    if not layout.has_header:
        f.seek(0)
    return (lambda text, line_no, offset: _parse_tsv(text, layout, path, line_no, offset)), int(layout.has_header)


def iter_passage_chunks(path: str | os.PathLike, chunk_size: int, *, shard_index: int = 0, num_shards: int = 1,
                        skip_chunks: Iterable[int] = (), on_error: OnError = "raise",
                        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, list[Passage],
                                                                                        ReadReport]]:
    """Yields (chunk index, passages, that chunk's report) for this shard's chunks.

    The corpus is a DPR TSV (`id text title`, header optional) or, for a
    `.jsonl` name, BEIR's corpus.jsonl. Chunk `c` holds data lines [c * chunk_size, (c + 1) * chunk_size); shard `s`
    of `n` owns the chunks with c % n == s. Lines of other shards' chunks and of
    `skip_chunks` (finished in an earlier run) are stepped over unparsed.
    Duplicate ids are detected among the lines this call parses; the embedding
    store checks global uniqueness when the chunks are joined.
    """
    on_error = check_on_error(on_error)
    if chunk_size <= 0 or not 0 <= shard_index < num_shards:
        raise ValueError(f"bad chunking: chunk_size={chunk_size}, shard {shard_index} of {num_shards}")
    path, skip = str(path), set(skip_chunks)
    seen: set[str] = set()
    with _open_binary(path) as f:
        parse, line_no = _corpus_parser(f, path, max_line_bytes)
        offset = f.tell()
        chunk, data_line = 0, 0
        while True:
            mine = chunk % num_shards == shard_index and chunk not in skip
            report, passages = ReadReport(f"{path} chunk {chunk}"), []
            for raw in f:
                line_no += 1
                data_line += 1
                line_offset, offset = offset, offset + len(raw)
                if mine:
                    report.read += 1
                    try:
                        p = parse(_decode(raw, path, line_no, max_line_bytes), line_no, line_offset)
                        if p.id in seen:
                            raise InputError(path, line_no, f"duplicate id: {p.id!r}")
                        seen.add(p.id)
                        passages.append(p)
                        report.used += 1
                    except InputError as e:
                        report.reject(e, on_error)
                if data_line % chunk_size == 0:
                    break
            else:  # end of file
                if mine and report.read:
                    yield chunk, passages, report
                return
            if mine:
                yield chunk, passages, report
            chunk += 1


def passage_id_hashes(ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of passage ids (BLAKE2b; the same in every process and run): 8 bytes an id, where the
    ids themselves (a URL each, in some corpora) would take any width."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64)


@dataclasses.dataclass(frozen=True)
class PassageOffsets:
    """Where each passage's line starts in the corpus file, keyed by id hash, sorted: 16 bytes a passage.

    Recorded while the corpus is encoded (one pass over it that happens anyway), it
    lets every later stage read just the passages it needs by seeking to them.
    """

    hashes: np.ndarray  # (n,) uint64, ascending
    offsets: np.ndarray  # (n,) int64, the byte offsets in the same order

    @classmethod
    def build(cls, hashes: np.ndarray, offsets: np.ndarray) -> PassageOffsets:
        order = np.argsort(hashes, kind="stable")
        return cls(np.ascontiguousarray(hashes[order]), np.ascontiguousarray(offsets[order], dtype=np.int64))

    def candidates(self, ids: Sequence[str]) -> list[tuple[int, str]]:
        """(offset, id) of every line that may hold each id: usually one; more if two ids' hashes collide."""
        hashes = passage_id_hashes(ids)
        lo, hi = np.searchsorted(self.hashes, hashes, "left"), np.searchsorted(self.hashes, hashes, "right")
        return [(int(o), i) for i, a, b in zip(ids, lo, hi, strict=True) for o in self.offsets[a:b]]


def lookup_passages(path: str | os.PathLike, ids: Iterable[str], *, offsets: PassageOffsets | None = None,
                    on_error: OnError = "raise", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                    chunk_size: int = 1 << 16) -> dict[str, Passage]:
    """The passages with the given ids; nothing else of the corpus is kept (R@kt needs the top-k texts, not 21M).

    With `offsets`, the wanted lines are read by seeking to them, in file order;
    without, in one streaming pass that keeps a chunk of `chunk_size` lines at a
    time. Ids that the corpus lacks are an error: a retrieved id must exist.
    """
    wanted, found = set(ids), {}
    if offsets is not None:
        found = _read_at_offsets(str(path), offsets.candidates(sorted(wanted)), max_line_bytes)
    else:
        for _, chunk, _ in iter_passage_chunks(path, chunk_size, on_error=on_error, max_line_bytes=max_line_bytes):
            found.update((p.id, p) for p in chunk if p.id in wanted)
    missing = wanted - found.keys()
    if missing:
        where = ("at the offsets recorded when the corpus was encoded (did the file change since?)"
                 if offsets is not None else "in the corpus")
        raise KeyError(f"{path}: {len(missing)} passage ids not {where}, e.g. {sorted(missing)[:5]}")
    return found


def _read_at_offsets(path: str, candidates: list[tuple[int, str]], max_line_bytes: int) -> dict[str, Passage]:
    """The passages of (offset, id) pairs; a line whose id is not the wanted one is a hash collision's other id."""
    found: dict[str, Passage] = {}
    with _open_binary(path) as f:
        parse, _ = _corpus_parser(f, path, max_line_bytes)
        for offset, pid in sorted(candidates):  # forward seeks only: a .gz file is read at most once
            f.seek(offset)
            raw = f.readline(max_line_bytes + 2)
            try:
                p = parse(_decode(raw, path, 0, max_line_bytes), 0, offset)
            except InputError as e:
                raise InputError(path, 0, f"byte {offset}: {e.reason} (the line of passage {pid!r} when it was "
                                          "encoded: the corpus changed since; encode it again)") from None
            if p.id == pid:
                found[pid] = p
    return found


def read_queries(path: str | os.PathLike, *, on_error: OnError = "raise", default_lang: str = "",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Query], ReadReport]:
    """Queries from JSONL (read_queries_jsonl) or, for a `.tsv` name, TREC-style topics: `id<TAB>text` lines,
    all in `default_lang`."""
    if not str(path).removesuffix(".gz").endswith(".tsv"):
        return read_queries_jsonl(path, on_error=on_error, default_lang=default_lang, max_line_bytes=max_line_bytes)
    on_error = check_on_error(on_error)
    path = str(path)
    if not default_lang:
        raise ValueError(f"{path}: a TSV query file has no language column; set the default language")
    lang = normalize_language_code(default_lang, source="default language")
    seen: set[str] = set()

    def parse(text: str, line_no: int) -> Query:
        fields = text.split("\t")
        if len(fields) != 2:
            raise InputError(path, line_no, f"wrong column count: expected 2 (id, text), got {len(fields)}")
        return _checked_query(fields[0].strip(), fields[1].strip(), lang, path, line_no, seen)
    return _read_lines(path, parse, on_error, max_line_bytes)


def _read_lines(path: str, parse: Callable[[str, int], Query], on_error: OnError,
                max_line_bytes: int) -> tuple[list[Query], ReadReport]:
    """`parse(text, line_no)` of every non-blank line, bad ones raised or counted per `on_error`."""
    report, records = ReadReport(path), []
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.read += 1
            try:
                records.append(parse(_decode(raw, path, line_no, max_line_bytes), line_no))
                report.used += 1
            except InputError as e:
                report.reject(e, on_error)
    return records, report


def read_queries_jsonl(path: str | os.PathLike, *, on_error: OnError = "raise",
                       text_fields: tuple[str, ...] = ("text", "question", "query"), default_lang: str = "",
                       max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Query], ReadReport]:
    """Queries from JSONL: `id` (BEIR: `_id`), the text (`text`, `question` as in XOR-TyDi, or `query`), the language.

    The language is `lang` or `language`, top-level or in BEIR's `metadata`;
    a query without one gets `default_lang`, and is an error if that is ''.
    Language codes are normalised (XOR-TyDi's train file writes Arabic as " ar").
    """
    on_error = check_on_error(on_error)
    if default_lang:
        default_lang = normalize_language_code(default_lang, source="default language")
    path, seen = str(path), set()
    return _read_lines(path, lambda text, line_no: _parse_query(text, path, line_no, text_fields, default_lang, seen),
                       on_error, max_line_bytes)


def _parse_query(text: str, path: str, line_no: int, text_fields: tuple[str, ...], default_lang: str,
                 seen: set[str]) -> Query:
    record = _json_object(text, path, line_no)
    key = next((k for k in QUERY_ID_FIELDS if k in record), None)
    field = next((f for f in text_fields if f in record), None)
    lang = _record_language(record, path, line_no, default_lang)
    missing = [name for name, ok in (("id", key is not None), ("|".join(text_fields), field is not None),
                                     ("lang", bool(lang))) if not ok]
    if missing:
        raise InputError(path, line_no, f"missing field: {', '.join(missing)}")
    return _checked_query(str(record[key]).strip(), str(record[field]).strip(), lang, path, line_no, seen)


def _checked_query(qid: str, body: str, lang: str, path: str, line_no: int, seen: set[str]) -> Query:
    if not qid:
        raise InputError(path, line_no, "empty id")
    if not body:
        raise InputError(path, line_no, f"empty text: query {qid!r}")
    if qid in seen:
        raise InputError(path, line_no, f"duplicate id: {qid!r}")
    seen.add(qid)
    return Query(qid, body, lang)


Qrels = dict[str, dict[str, int]]  # query id -> passage id -> relevance grade


def read_qrels(path: str | os.PathLike, *, on_error: OnError = "raise",
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[Qrels, ReadReport]:
    """Relevance judgements in BEIR's TSV (`query-id corpus-id score`, with that header) or TREC's form
    (`query-id iteration corpus-id grade`, whitespace-separated).

    Grades are integers; 0 and below judge a passage not relevant (kept: graded
    nDCG and trec_eval read them). A pair judged twice is an error.
    """
    on_error = check_on_error(on_error)
    path = str(path)
    report, qrels = ReadReport(path), {}
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            text = _decode(raw, path, line_no, max_line_bytes)
            if not text.strip():
                continue
            fields = text.split("\t") if "\t" in text else text.split()
            fields = [x.strip() for x in fields]
            if line_no == 1 and fields[:2] == ["query-id", "corpus-id"]:
                continue  # BEIR's header
            report.read += 1
            try:
                qid, pid, grade = _parse_qrel(fields, path, line_no)
                if pid in qrels.get(qid, {}):
                    raise InputError(path, line_no, f"duplicate judgement: query {qid!r}, passage {pid!r}")
                qrels.setdefault(qid, {})[pid] = grade
                report.used += 1
            except InputError as e:
                report.reject(e, on_error)
    return qrels, report


def _parse_qrel(fields: list[str], path: str, line_no: int) -> tuple[str, str, int]:
    if len(fields) == 3:
        qid, pid, grade = fields
    elif len(fields) == 4:
        qid, _, pid, grade = fields
    else:
        raise InputError(path, line_no, f"wrong column count: expected 3 (BEIR: query-id corpus-id score) or 4 "
                                        f"(TREC: query-id iteration corpus-id grade), got {len(fields)}")
    if not qid or not pid:
        raise InputError(path, line_no, "empty id")
    try:
        return qid, pid, int(grade)
    except ValueError:
        raise InputError(path, line_no, f"bad grade: {grade!r} is not an integer") from None
