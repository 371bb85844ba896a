"""Host-side batches for every jitted program: few padded shapes, little padding, no recompilation.

Texts are sorted by token length and cut into batches whose padded length is
the smallest configured bucket that fits; each bucket has one row count chosen
so that rows x length stays near a token budget. A run therefore compiles at
most (buckets x a few tail sizes) programs, and padding waste is bounded by
the bucket spacing instead of by the longest text of the corpus. The retriever,
the teacher and training all pad and pack through this file, and the loop that
keeps the device busy while the host builds the next batch is here too.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")
_K = TypeVar("_K")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Row `r` of the padded arrays holds text `rows[r]`; -1 marks a filler row."""

    rows: np.ndarray
    ids: np.ndarray
    mask: np.ndarray


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def batch_rows_for(bucket: int, tokens_per_batch: int, multiple_of: int) -> int:
    """Rows per batch for a bucket: the token budget, rounded to the data axis."""
    rows = max(1, tokens_per_batch // bucket)
    return max(multiple_of, rows // multiple_of * multiple_of)


def _tail_sizes(full: int, multiple_of: int) -> list[int]:
    """Full size, then halvings (rounded up to the data-axis multiple) down to it, largest first.

    Rounding up keeps the ladder going past odd halves (84 -> 42 -> 22 -> 12
    -> 6 -> 4 -> 2 on two devices) so that a small tail never pads to a
    large batch.
    """
    sizes = [full]
    while sizes[-1] > multiple_of:
        half = max(multiple_of, -(-(sizes[-1] // 2) // multiple_of) * multiple_of)
        if half >= sizes[-1]:
            break
        sizes.append(half)
    return sizes


def _next_batch_size(sizes: list[int], remaining: int) -> int:
    """The smallest of `sizes` (largest first) that holds `remaining` rows, else the largest."""
    fitting = [s for s in sizes if s >= remaining]
    return fitting[-1] if fitting else sizes[0]


def chunk_rows(members: Sequence[_T], length: int, tokens_per_batch: int,
            multiple_of: int) -> Iterator[tuple[Sequence[_T], int]]:
    """Consecutive runs of `members` and the batch size each is padded to.

    Full batches of the row count for `length`, then the smallest halving that
    holds the tail (see :func:`_tail_sizes`).
    """
    sizes = _tail_sizes(batch_rows_for(length, tokens_per_batch, multiple_of), multiple_of)
    start = 0
    while start < len(members):
        size = _next_batch_size(sizes, len(members) - start)
        yield members[start:start + size], size
        start += size


def plan_batches(token_ids: Sequence[Sequence[int]], buckets: Sequence[int], tokens_per_batch: int,
                 pad_id: int, multiple_of: int = 1) -> list[Batch]:
    """Groups tokenized texts into padded batches (see module docstring).

    The last rows of a bucket go into the smallest halving of the full batch
    size that holds them, so a bucket with few texts is not padded up to a
    full batch of filler rows.
    """
    buckets = sorted(int(b) for b in buckets)
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    if len(lengths) and lengths.min() == 0:
        raise ValueError(f"text {int(np.argmin(lengths))} has no tokens")
    order = np.argsort(lengths, kind="stable")
    bucket_of = np.array([bucket_for(int(n), buckets) for n in lengths[order]], dtype=np.int64)
    batches: list[Batch] = []
    for bucket in buckets:
        members = order[bucket_of == bucket]
        if not len(members):
            continue
        for take, size in chunk_rows(members, bucket, tokens_per_batch, multiple_of):
            rows = np.full((size,), -1, dtype=np.int64)
            rows[:len(take)] = take
            ids, mask = pad_rows([token_ids[i] for i in take], size, bucket, pad_id)
            batches.append(Batch(rows=rows, ids=ids, mask=mask))
    return batches


def pad_rows(sequences: Sequence[Sequence[int]], size: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`sequences` in the first rows of a (size, length) int32 array, and its mask.

    Rows past the sequences are filler (data-axis and bucket rounding); they get
    one visible token so that no attention softmax row is fully masked, and
    their outputs are dropped by the caller.
    """
    ids = np.full((size, length), pad_id, dtype=np.int32)
    mask = np.zeros((size, length), dtype=np.int32)
    for r, t in enumerate(sequences):
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    mask[len(sequences):, 0] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Several texts per row. `rows[r, s]` is the text in segment s + 1 of row r (-1: none)."""

    rows: np.ndarray
    ids: np.ndarray
    segments: np.ndarray
    positions: np.ndarray


def pack_rows(lengths: np.ndarray, row_lengths: Sequence[int], max_segments: int) -> list[tuple[int, list[int]]]:
    """Best-fit-decreasing bin packing of texts into rows; returns (row length, texts) per row.

    Texts are placed longest first, each into the open row with the least room
    that still fits it (at most `max_segments` texts per row); only when none
    fits is a new row opened, of the smallest allowed length that holds the
    text. Short texts thus fill the gaps of long rows first and the rest land in
    short rows, whose attention costs less (it grows with the row length).
    Rows are kept in lists by free room: a placement costs O(max row length).
    """
    row_lengths = sorted(int(r) for r in row_lengths)
    longest = row_lengths[-1]
    if len(lengths) and lengths.max() > longest:
        raise ValueError(f"text of {int(lengths.max())} tokens does not fit a packed row of {longest}")
    by_room: list[list[int]] = [[] for _ in range(longest + 1)]  # free room -> open row ids
    rows: list[tuple[int, list[int]]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        target = next((r for r in range(n, longest + 1) if by_room[r]), None)
        if target is None:
            size = next(r for r in row_lengths if r >= n)
            rows.append((size, []))
            room.append(size)
            row = len(rows) - 1
        else:
            row = by_room[target].pop()
        rows[row][1].append(int(i))
        room[row] -= n
        if len(rows[row][1]) < max_segments and room[row] > 0:
            by_room[room[row]].append(row)
    return rows


def pack_pair_rows(input_lengths: np.ndarray, target_lengths: np.ndarray, row_lengths: Sequence[int],
                   target_room: int, max_segments: int) -> list[tuple[int, list[int]]]:
    """:func:`pack_rows` for (input, target) pairs, whose two parts go into rows of two lengths.

    An encoder-decoder row holds the inputs of its pairs in an encoder row (a
    length of `row_lengths`) and their targets, in the same order, in a decoder
    row of at most `target_room` tokens. Pairs are placed by input length,
    longest first, into the open row with the least input room that fits the
    input and still has room for the target; returns (input row length, pairs)
    per row. A row is closed once it cannot take even the shortest target.
    """
    input_lengths = np.asarray(input_lengths, dtype=np.int64)
    target_lengths = np.asarray(target_lengths, dtype=np.int64)
    if input_lengths.shape != target_lengths.shape:
        raise ValueError(f"{len(input_lengths)} input lengths but {len(target_lengths)} target lengths")
    row_lengths = sorted(int(r) for r in row_lengths)
    longest = row_lengths[-1]
    if not len(input_lengths):
        return []
    if min(input_lengths.min(), target_lengths.min()) <= 0:
        raise ValueError("every pair needs at least one input and one target token")
    if input_lengths.max() > longest:
        raise ValueError(f"input of {int(input_lengths.max())} tokens does not fit a packed row of {longest}")
    if target_lengths.max() > target_room:
        raise ValueError(f"target of {int(target_lengths.max())} tokens does not fit a packed row of {target_room}")
    shortest_target = int(target_lengths.min())
    by_room: list[list[int]] = [[] for _ in range(longest + 1)]  # free input room -> open row ids
    rows: list[tuple[int, list[int]]] = []
    room: list[int] = []
    target_left: list[int] = []
    for i in np.argsort(-input_lengths, kind="stable"):
        n, m = int(input_lengths[i]), int(target_lengths[i])
        row = None
        for r in range(n, longest + 1):
            candidates = by_room[r]
            # Most open rows have target room to spare: the scan rarely goes past the last one.
            for j in range(len(candidates) - 1, -1, -1):
                if target_left[candidates[j]] >= m:
                    row = candidates.pop(j)
                    break
            if row is not None:
                break
        if row is None:
            size = next(r for r in row_lengths if r >= n)
            rows.append((size, []))
            room.append(size)
            target_left.append(int(target_room))
            row = len(rows) - 1
        rows[row][1].append(int(i))
        room[row] -= n
        target_left[row] -= m
        if len(rows[row][1]) < max_segments and room[row] > 0 and target_left[row] >= shortest_target:
            by_room[room[row]].append(row)
    return rows


def plan_packed(token_ids: Sequence[Sequence[int]], row_lengths: Sequence[int], tokens_per_batch: int,
                max_segments: int, pad_id: int, multiple_of: int = 1) -> list[PackedBatch]:
    """Packs texts into batches of one shape per row length (plus halvings for each tail)."""
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    if len(lengths) and lengths.min() == 0:
        raise ValueError(f"text {int(np.argmin(lengths))} has no tokens")
    packed = pack_rows(lengths, row_lengths, max_segments)
    batches = []
    for row_length in sorted({size for size, _ in packed}):
        rows = [texts for size, texts in packed if size == row_length]
        for chunk, size in chunk_rows(rows, row_length, tokens_per_batch, multiple_of):
            batches.append(fill_packed(token_ids, chunk, size, row_length, max_segments, pad_id))
    return batches


def fill_packed(token_ids: Sequence[Sequence[int]], rows: list[list[int]], size: int, row_length: int,
                max_segments: int, pad_id: int) -> PackedBatch:
    """`rows[r]` lists the texts (indices into `token_ids`) of row r; rows past them are filler (segment 0)."""
    ids = np.full((size, row_length), pad_id, dtype=np.int32)
    segments = np.zeros((size, row_length), dtype=np.int32)
    positions = np.zeros((size, row_length), dtype=np.int32)
    members = np.full((size, max_segments), -1, dtype=np.int64)
    for r, texts in enumerate(rows):
        offset = 0
        for s, i in enumerate(texts):
            t = token_ids[i]
            ids[r, offset:offset + len(t)] = t
            segments[r, offset:offset + len(t)] = s + 1
            positions[r, offset:offset + len(t)] = np.arange(len(t))
            members[r, s] = i
            offset += len(t)
    return PackedBatch(rows=members, ids=ids, segments=segments, positions=positions)


@dataclasses.dataclass(frozen=True)
class PairGroup:
    """One padded batch of (input, target) pairs: `rows[r]` is the pair in row r (-1: filler)."""

    rows: np.ndarray
    input_length: int
    target_length: int


def plan_pair_groups(input_lengths: np.ndarray, target_lengths: np.ndarray, input_buckets: Sequence[int],
                     target_buckets: Sequence[int], tokens_per_batch: int,
                     multiple_of: int = 1) -> list[PairGroup]:
    """Batches of pairs, each padded to one (input bucket, target bucket) shape.

    The teacher's two sequences (passage prompt, query target) are padded
    independently, so a long passage with a short query is not padded to the
    longest query and vice versa. Pairs are grouped by input bucket (rows per
    batch follow that bucket's token budget: the body of the model dominates,
    the LM head only sees target tokens), sorted by target length inside it, and
    cut into full batches; each batch's target length is the smallest target
    bucket that holds its longest target. Sorting keeps that bucket tight
    without splitting an input bucket into one small group per target bucket,
    which would pad every group's tail.
    """
    input_lengths = np.asarray(input_lengths, dtype=np.int64)
    target_lengths = np.asarray(target_lengths, dtype=np.int64)
    if input_lengths.shape != target_lengths.shape:
        raise ValueError(f"{len(input_lengths)} input lengths but {len(target_lengths)} target lengths")
    if len(input_lengths) and min(input_lengths.min(), target_lengths.min()) <= 0:
        raise ValueError("every pair needs at least one input and one target token")
    input_buckets = sorted(int(b) for b in input_buckets)
    target_buckets = sorted(int(b) for b in target_buckets)
    if len(target_lengths) and target_lengths.max() > target_buckets[-1]:
        raise ValueError(f"target of {int(target_lengths.max())} tokens exceeds the largest bucket "
                         f"{target_buckets[-1]}")
    in_bucket = np.array([bucket_for(int(n), input_buckets) for n in input_lengths], dtype=np.int64)
    groups: list[PairGroup] = []
    for a in input_buckets:
        members = np.flatnonzero(in_bucket == a)
        if not len(members):
            continue
        members = members[np.lexsort((input_lengths[members], target_lengths[members]))]
        for take, size in chunk_rows(members, a, tokens_per_batch, multiple_of):
            rows = np.full((size,), -1, dtype=np.int64)
            rows[:len(take)] = take
            b = bucket_for(int(target_lengths[take].max()), target_buckets)
            groups.append(PairGroup(rows=rows, input_length=a, target_length=b))
    return groups


def dispatch_ahead(batches: Iterable[tuple[_K, Any]], run: Callable[[Any], Any], collect: Callable[[_K, Any], None],
                   in_flight: int = 2) -> None:
    """Calls `run(arrays)` per (key, arrays) and `collect(key, output)` in order, up to `in_flight` batches later.

    A jitted call returns before the device finishes; reading its output
    blocks. Collecting a batch only after the next ones are dispatched lets the
    host build and transfer batch i + 1 (tokens to arrays, padding, device_put)
    while the device still computes batch i, instead of leaving one of the two
    idle at every step.
    """
    pending: deque[tuple[_K, Any]] = deque()
    for key, arrays in batches:
        pending.append((key, run(arrays)))
        if len(pending) > in_flight:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
