"""Corpus -> passage embeddings on disk, in chunks that survive a killed run.

The corpus is cut into fixed chunks of lines (see :mod:`umr_jax.data.readers`).
Each chunk is encoded with the retriever's passage tower (data-parallel over
the mesh, length-bucketed or packed) and written as three files:

  chunk-000012.npy        embeddings (count, dim)
  chunk-000012.ids.txt    passage ids, one per line, same order
  chunk-000012.offsets.npy  (count, 2) uint64: each passage's id hash and the byte offset of its
                          line in the corpus file (corpus files only): later stages seek to the
                          passages they need (readers.PassageOffsets)
  chunk-000012.json       commit marker: count, dim, dtype, skip counts

The marker is written last and atomically, so a chunk without a valid marker
is simply encoded again. JAX process `p` of `n` encodes chunks c with
c % n == p (give the retriever a process-local mesh), then writes
`done-p-of-n.json`; the store is complete when all n processes are done.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from umr_jax import atomic, faults, preemption, storage
from umr_jax.data.readers import (
    OnError,
    Passage,
    PassageOffsets,
    ReadReport,
    check_on_error,
    iter_passage_chunks,
    passage_id_hashes,
)


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.chunk_size = 100_000  # passages per on-disk chunk: the unit of resumption
    # How title and text form the encoder input (see format_passage): "{title} {text}" joins them
    # with a space, as Contriever's own scripts; "{title}{sep}{text}" is DPR's text pair.
    cfg.passage_template = "{title} {text}"
    cfg.on_error = "raise"  # bad corpus lines: 'raise' (file:line error) or 'skip' (counted)
    cfg.dtype = "float32"  # on-disk embedding dtype ('float16' halves 21M x 768 to 32 GB)
    return cfg


class StoreError(RuntimeError):
    pass


def format_passage(p: Passage, template: str, separator: str = "") -> str:
    """The encoder's input text of a passage: `template` with fields {title}, {text} and {sep}.

    {sep} is the tokenizer's separator token between spaces when the passage
    has a title, and nothing when it has none, so "{title}{sep}{text}" with a
    BERT tokenizer (whose "[SEP]" in text is its special token) gives DPR's
    text pair, [CLS] title [SEP] text [SEP], and an untitled passage its text
    alone, as DPR's tensorizer encodes them (the official UMR code's passage
    input). Truncation then cuts the text's tail, as DPR's longest-first
    truncation does unless the title is the longer part.
    """
    if "{sep}" in template and not separator:
        raise ValueError(f"encode.passage_template {template!r} uses {{sep}}, but the retriever's tokenizer "
                         "has no separator token")
    sep = f" {separator} " if p.title else ""
    return template.format(title=p.title, text=p.text, sep=sep).strip()


@dataclasses.dataclass
class EmbeddingStore:
    """A directory of committed embedding chunks (see module docstring)."""

    directory: str

    def _path(self, chunk: int, suffix: str) -> str:
        return os.path.join(self.directory, f"chunk-{chunk:06d}{suffix}")

    def _done_path(self, process_index: int, process_count: int) -> str:
        return os.path.join(self.directory, f"done-{process_index}-of-{process_count}.json")

    def chunk_indices(self) -> list[int]:
        """Chunks whose commit marker exists (their data files are checked on read)."""
        found = []
        for path in storage.glob(self.directory, "chunk-*.json"):
            m = re.fullmatch(r"chunk-(\d+)\.json", os.path.basename(path))
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def valid_chunks(self) -> set[int]:
        """Committed chunks whose files are intact; anything else is re-encoded."""
        good = set()
        for c in self.chunk_indices():
            try:
                self.read_chunk(c, mmap=True)
                good.add(c)
            except StoreError as e:
                logging.warning("re-encoding chunk %d: %s", c, e)
        return good

    def write_chunk(self, chunk: int, ids: Sequence[str], embeddings: np.ndarray, report: ReadReport,
                    offsets: Sequence[int] | None = None) -> None:
        if len(ids) != len(embeddings):
            raise ValueError(f"chunk {chunk}: {len(ids)} ids but {len(embeddings)} embeddings")
        atomic.save_npy(self._path(chunk, ".npy"), embeddings)
        if offsets is not None:
            atomic.save_npy(self._path(chunk, ".offsets.npy"),
                            np.stack([passage_id_hashes(ids), np.asarray(offsets, np.uint64)], axis=1)
                            if len(ids) else np.zeros((0, 2), np.uint64))
        atomic.write_text(self._path(chunk, ".ids.txt"), "".join(f"{i}\n" for i in ids))
        atomic.write_json(self._path(chunk, ".json"), {
            "chunk": chunk, "count": len(ids), "dim": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
            "dtype": str(embeddings.dtype), "report": report.to_dict()})

    def read_chunk(self, chunk: int, mmap: bool = False) -> tuple[list[str], np.ndarray, dict]:
        marker = self._path(chunk, ".json")
        try:
            meta = atomic.read_json(marker)
            emb = storage.load_npy(self._path(chunk, ".npy"), mmap=mmap)
        except (OSError, ValueError, KeyError) as e:
            raise StoreError(f"{marker}: chunk unreadable ({e})") from None
        if emb.shape[0] != meta["count"]:
            raise StoreError(f"{marker}: marker says {meta['count']} passages, found {emb.shape[0]} embeddings")
        return self._read_ids(chunk, meta), emb, meta

    def _read_ids(self, chunk: int, meta: dict) -> list[str]:
        marker = self._path(chunk, ".json")
        try:
            ids = storage.read_text(self._path(chunk, ".ids.txt")).splitlines()
        except OSError as e:
            raise StoreError(f"{marker}: chunk unreadable ({e})") from None
        if len(ids) != meta["count"]:
            raise StoreError(f"{marker}: marker says {meta['count']} passages, found {len(ids)} ids")
        return ids

    def mark_done(self, process_index: int, process_count: int, num_chunks: int, report: ReadReport) -> None:
        atomic.write_json(self._done_path(process_index, process_count),
                          {"num_chunks": num_chunks, "report": report.to_dict()})

    def expected_files(self) -> list[str]:
        """The files of a finished store: the done markers of every process (of the process count that finished
        it) and every chunk's three files up to the markers' chunk count; missing ones mean a damaged store."""
        markers: dict[int, dict[int, str]] = {}
        for path in storage.glob(self.directory, "done-*-of-*.json"):
            m = re.fullmatch(r"done-(\d+)-of-(\d+)\.json", os.path.basename(path))
            if m:
                markers.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
        # The process count whose markers are all there, else the one with the most (its missing ones named).
        n = max(markers, key=lambda k: (len(markers[k]) == k, len(markers[k])), default=1)
        files = [self._done_path(p, n) for p in range(n)]

        def chunk_count(path: str) -> int:
            try:
                return int(atomic.read_json(path)["num_chunks"])
            except (OSError, ValueError, KeyError, TypeError):
                return 0  # a damaged marker: its chunks are checked when read

        num_chunks = max((chunk_count(path) for path in markers.get(n, {}).values()), default=0)
        return files + [self._path(c, suffix) for c in range(num_chunks) for suffix in (".json", ".npy", ".ids.txt")]

    def _complete_chunks(self) -> list[int]:
        chunks = self.chunk_indices()
        if not chunks:
            raise StoreError(f"{self.directory}: no embedding chunks")
        missing = sorted(set(range(chunks[-1] + 1)) - set(chunks))
        if missing:
            raise StoreError(f"{self.directory}: chunks {missing[:10]} missing; finish encoding first")
        return chunks

    def load_ids(self, process_index: int = 0, process_count: int = 1) -> list[str]:
        """The passage ids of `load` alone (a saved index needs no embeddings), checked to be unique."""
        ids = [i for c in self._complete_chunks()[process_index::process_count]
               for i in self._read_ids(c, atomic.read_json(self._path(c, ".json")))]
        self._check_unique(ids)
        return ids

    def load(self, process_index: int = 0, process_count: int = 1) -> tuple[list[str], np.ndarray]:
        """Chunks joined in corpus order: all, or process p's shard of n (chunks c with c % n == p).

        The embeddings are read into one array sized from the chunk markers, so
        loading never holds them twice. Passage ids must be unique (checked
        within what is loaded).
        """
        chunks = self._complete_chunks()[process_index::process_count]
        metas = [atomic.read_json(self._path(c, ".json")) for c in chunks]
        counts = [int(m["count"]) for m in metas]
        dims = {int(m["dim"]) for m, n in zip(metas, counts, strict=True) if n}
        dtypes = {m["dtype"] for m, n in zip(metas, counts, strict=True) if n}
        if len(dims) > 1 or len(dtypes) > 1:
            raise StoreError(f"{self.directory}: chunks disagree on the embedding shape: dims {sorted(dims)}, "
                             f"dtypes {sorted(dtypes)}; encode the corpus again into an empty directory")
        embeddings = np.zeros((sum(counts), dims.pop() if dims else 0), dtypes.pop() if dtypes else np.float32)
        ids: list[str] = []
        for c, n in zip(chunks, counts, strict=True):
            if not n:
                continue
            chunk_ids, emb, _ = self.read_chunk(c, mmap=True)
            embeddings[len(ids):len(ids) + n] = emb
            ids.extend(chunk_ids)
        self._check_unique(ids)
        return ids, embeddings

    def _check_unique(self, ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            seen, dups = set(), []
            for i in ids:
                if i in seen:
                    dups.append(i)
                seen.add(i)
            raise StoreError(f"{self.directory}: {len(dups)} duplicate passage ids across chunks, "
                             f"e.g. {dups[:5]}")

    def passage_offsets(self) -> PassageOffsets | None:
        """Every passage's line offset in the corpus file (all chunks, every process's), or None: encoding is
        not finished, or a chunk has no offsets (in-memory passages, or written before offsets were recorded).

        Only the done markers and the chunks' offset files are read: a store whose
        embeddings (.npy) were deleted to save disk still serves lookups.
        """
        files = self.expected_files()
        markers = [f for f in files if os.path.basename(f).startswith("done-")]
        chunks = [f.removesuffix(".json") for f in files if re.search(r"chunk-\d+\.json$", f)]
        paths = [f"{c}.offsets.npy" for c in chunks]
        if not all(map(storage.exists, markers + paths)):
            return None
        table = np.concatenate([storage.load_npy(p) for p in paths]) if paths else np.zeros((0, 2), np.uint64)
        return PassageOffsets.build(table[:, 0], table[:, 1].astype(np.int64))

    def report(self) -> ReadReport:
        total = ReadReport(self.directory)
        for c in self.chunk_indices():
            total.merge(ReadReport.from_dict(atomic.read_json(self._path(c, ".json"))["report"]))
        return total


ChunkSource = Callable[[set[int]], Iterator[tuple[int, list[Passage], ReadReport]]]


def file_chunks(path: str, chunk_size: int, process_index: int, process_count: int,
                on_error: OnError) -> ChunkSource:
    def chunks(done: set[int]):
        return iter_passage_chunks(path, chunk_size, shard_index=process_index, num_shards=process_count,
                                   skip_chunks=done, on_error=on_error)
    return chunks


def list_chunks(passages: Sequence[Passage], chunk_size: int, process_index: int,
                process_count: int) -> ChunkSource:
    """In-memory passages (e.g. the XQuAD-R pool) chunked like a file would be."""
    def chunks(done: set[int]):
        for c, start in enumerate(range(0, len(passages), chunk_size)):
            if c % process_count == process_index and c not in done:
                part = list(passages[start:start + chunk_size])
                yield c, part, ReadReport(f"passages[{start}:{start + len(part)}]", len(part), len(part))
    return chunks


def encode_corpus(encode: Callable[..., np.ndarray], source: ChunkSource, out_dir: str, *,
                  template: str = "{title} {text}", separator: str = "", dtype: str = "float32",
                  process_index: int = 0, process_count: int = 1, desc: str = "encode corpus") -> EmbeddingStore:
    """Encodes every chunk of `source` not yet committed in `out_dir`.

    `encode(texts, bar=...)` returns (len(texts), dim) embeddings, e.g.
    ``functools.partial(retriever.encode, tower="passage", progress=False)``.
    Re-running after a kill redoes only the chunks without a valid marker.
    """
    store = EmbeddingStore(out_dir)
    storage.makedirs(out_dir)
    done = store.valid_chunks()
    if done:
        logging.info("%s: %d chunks already encoded, resuming", out_dir, len(done))
    total = ReadReport(out_dir)
    start, encoded, last_chunk = time.perf_counter(), 0, -1
    with tqdm(desc=desc, unit="passage", smoothing=0.05, dynamic_ncols=True) as bar:
        for chunk, passages, report in source(done):
            texts = [format_passage(p, template, separator) for p in passages]
            emb = encode(texts, bar=bar) if texts else np.zeros((0, 0), np.float32)
            faults.point("encode.chunk_encoded")
            offsets = [p.offset for p in passages]
            store.write_chunk(chunk, [p.id for p in passages], emb.astype(dtype, copy=False), report,
                              offsets=offsets if all(o >= 0 for o in offsets) else None)
            faults.point("encode.chunk_committed")
            preemption.stop_if_requested(f"after committing corpus chunk {chunk} in {out_dir}")
            total.merge(report)
            encoded += len(texts)
            last_chunk = max(last_chunk, chunk)
    num_chunks = max([last_chunk, *done]) + 1 if (done or last_chunk >= 0) else 0
    store.mark_done(process_index, process_count, num_chunks, total)
    elapsed = time.perf_counter() - start
    logging.info("%s: encoded %d passages in %.1fs (%.1f/s); this run's input: %s", out_dir, encoded, elapsed,
                 encoded / max(elapsed, 1e-9), total.summary())
    return store


def encode_corpus_file(retriever, path: str, out_dir: str, cfg: ml_collections.ConfigDict,
                      process_index: int = 0, process_count: int = 1) -> EmbeddingStore:
    """The corpus-encoding stage of a round, for a corpus file (DPR TSV or BEIR corpus.jsonl)."""
    source = file_chunks(path, int(cfg.chunk_size), process_index, process_count, check_on_error(cfg.on_error))
    return encode_corpus(passage_encoder(retriever), source, out_dir, template=cfg.passage_template,
                         separator=retriever.separator, dtype=cfg.dtype, process_index=process_index,
                         process_count=process_count)


def encode_passages(retriever, passages: Iterable[Passage], out_dir: str, cfg: ml_collections.ConfigDict,
                    process_index: int = 0, process_count: int = 1) -> EmbeddingStore:
    source = list_chunks(list(passages), int(cfg.chunk_size), process_index, process_count)
    return encode_corpus(passage_encoder(retriever), source, out_dir, template=cfg.passage_template,
                         separator=retriever.separator, dtype=cfg.dtype, process_index=process_index,
                         process_count=process_count)


def passage_encoder(retriever) -> Callable[..., np.ndarray]:
    """`encode(texts, bar=None)` with the retriever's passage tower, as encode_corpus wants it."""
    def encode(texts, bar=None):
        return retriever.encode(texts, "passage", progress=False, bar=bar)
    return encode
