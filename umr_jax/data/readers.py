"""Streaming readers for passage corpora (DPR TSV) and query files (JSONL).

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
import json
import os
from collections.abc import Iterable, Iterator
from typing import Literal

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
    try:
        return open(path, "rb")
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


def _parse_tsv(text: str, layout: _TsvLayout, path: str, line_no: int) -> Passage:
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
    return Passage(pid, body, title)


def iter_passage_chunks(path: str | os.PathLike, chunk_size: int, *, shard_index: int = 0, num_shards: int = 1,
                        skip_chunks: Iterable[int] = (), on_error: OnError = "raise",
                        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, list[Passage],
                                                                                        ReadReport]]:
    """Yields (chunk index, passages, that chunk's report) for this shard's chunks.

    Chunk `c` holds data lines [c * chunk_size, (c + 1) * chunk_size); shard `s`
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
        first = f.readline()
        try:
            layout = _TsvLayout(next(csv.reader([_decode(first, path, 1, max_line_bytes)], delimiter="\t")))
        except (csv.Error, StopIteration, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(path, 1, f"malformed TSV header: {e}") from None
        if not layout.has_header:
            f.seek(0)
        line_no = 1 if layout.has_header else 0
        chunk, data_line = 0, 0
        while True:
            mine = chunk % num_shards == shard_index and chunk not in skip
            report, passages = ReadReport(f"{path} chunk {chunk}"), []
            for raw in f:
                line_no += 1
                data_line += 1
                if mine:
                    report.read += 1
                    try:
                        p = _parse_tsv(_decode(raw, path, line_no, max_line_bytes), layout, path, line_no)
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


def lookup_passages(path: str | os.PathLike, ids: Iterable[str], *, on_error: OnError = "raise",
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> dict[str, Passage]:
    """The passages with the given ids, in one streaming pass (R@kt needs the top-k texts, not 21M).

    Ids that the corpus lacks are an error: a retrieved id must exist.
    """
    wanted, found = set(ids), {}
    for _, chunk, _ in iter_passage_chunks(path, 1 << 30, on_error=on_error, max_line_bytes=max_line_bytes):
        found.update((p.id, p) for p in chunk if p.id in wanted)
    missing = wanted - found.keys()
    if missing:
        raise KeyError(f"{path}: {len(missing)} passage ids not in the corpus, e.g. {sorted(missing)[:5]}")
    return found


def read_queries_jsonl(path: str | os.PathLike, *, on_error: OnError = "raise",
                       text_fields: tuple[str, ...] = ("text", "question"),
                       max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Query], ReadReport]:
    """Queries from JSONL: `id`, the text (`text`, or `question` as in XOR-TyDi), `lang`.

    Language codes are normalised (XOR-TyDi's train file writes Arabic as " ar").
    """
    on_error = check_on_error(on_error)
    path = str(path)
    report, queries, seen = ReadReport(path), [], set()
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.read += 1
            try:
                queries.append(_parse_query(_decode(raw, path, line_no, max_line_bytes), path, line_no,
                                            text_fields, seen))
                report.used += 1
            except InputError as e:
                report.reject(e, on_error)
    return queries, report


def _parse_query(text: str, path: str, line_no: int, text_fields: tuple[str, ...], seen: set[str]) -> Query:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, line_no, f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise InputError(path, line_no, f"malformed JSON: expected an object, got {type(record).__name__}")
    field = next((f for f in text_fields if f in record), None)
    missing = [name for name, ok in (("id", "id" in record), ("|".join(text_fields), field is not None),
                                     ("lang", "lang" in record)) if not ok]
    if missing:
        raise InputError(path, line_no, f"missing field: {', '.join(missing)}")
    qid, body = str(record["id"]).strip(), str(record[field]).strip()
    if not qid:
        raise InputError(path, line_no, "empty id")
    if not body:
        raise InputError(path, line_no, f"empty text: query {qid!r}")
    if qid in seen:
        raise InputError(path, line_no, f"duplicate id: {qid!r}")
    try:
        lang = normalize_language_code(str(record["lang"]), source=f"{path}:{line_no}")
    except ValueError as e:
        raise InputError(path, line_no, f"bad language: {e}") from None
    seen.add(qid)
    return Query(qid, body, lang)
