"""Length bucketing: few padded shapes, little padding, no recompilation.

Texts are sorted by token length and cut into batches whose padded length is
the smallest configured bucket that fits; each bucket has one row count chosen
so that rows x length stays near a token budget. A run therefore compiles at
most (buckets x a few tail sizes) programs, and padding waste is bounded by
the bucket spacing instead of by the longest text of the corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


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
    """Full size, then halvings down to the data-axis multiple, largest first."""
    sizes = [full]
    while sizes[-1] // 2 >= multiple_of and (sizes[-1] // 2) % multiple_of == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


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
        sizes = _tail_sizes(batch_rows_for(bucket, tokens_per_batch, multiple_of), multiple_of)
        start = 0
        while start < len(members):
            remaining = len(members) - start
            size = sizes[0]
            for s in sizes:  # smallest size that still holds the remainder
                if s >= remaining:
                    size = s
            take = members[start:start + size]
            start += len(take)
            batches.append(_pad(token_ids, take, size, bucket, pad_id))
    return batches


def _pad(token_ids: Sequence[Sequence[int]], take: np.ndarray, size: int, length: int,
         pad_id: int) -> Batch:
    ids = np.full((size, length), pad_id, dtype=np.int32)
    mask = np.zeros((size, length), dtype=np.int32)
    rows = np.full((size,), -1, dtype=np.int64)
    for r, i in enumerate(take):
        t = token_ids[i]
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
        rows[r] = i
    # Filler rows get one visible token so no softmax row is fully masked.
    mask[len(take):, 0] = 1
    return Batch(rows=rows, ids=ids, mask=mask)
