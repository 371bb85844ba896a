import numpy as np
import pytest

from umr_jax.batching import batch_rows_for, dispatch_ahead, pack_rows, pad_rows, plan_batches, plan_packed


def test_every_text_once_in_smallest_bucket():
    rng = np.random.default_rng(0)
    texts = [list(range(1, n + 1)) for n in rng.integers(1, 100, size=301)]
    batches = plan_batches(texts, buckets=(16, 32, 64, 128), tokens_per_batch=512, pad_id=0, multiple_of=4)
    seen = np.concatenate([b.rows[b.rows >= 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(texts)))
    shapes = set()
    for b in batches:
        assert b.ids.shape[0] % 4 == 0
        shapes.add(b.ids.shape)
        for r, i in enumerate(b.rows):
            if i < 0:
                assert b.mask[r].sum() == 1  # filler row: one visible token
                continue
            n = len(texts[i])
            assert b.mask[r].sum() == n and (b.ids[r, :n] == texts[i]).all() and (b.ids[r, n:] == 0).all()
            smaller = [L for L in (16, 32, 64, 128) if b.ids.shape[1] > L]
            assert not smaller or n > max(smaller)  # no smaller bucket would fit
    # Few distinct shapes: one full size per bucket plus halvings for tails.
    assert len(shapes) <= 4 * 4


def test_token_budget_rounding():
    assert batch_rows_for(16, 4096, 8) == 256
    assert batch_rows_for(512, 4096, 8) == 8
    assert batch_rows_for(512, 1024, 8) == 8  # never below the data-axis multiple


def test_empty_token_list_is_an_error():
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        plan_batches([[1], []], (4,), 16, 0)


def test_packing_places_every_text_once_within_limits():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 60, size=500)
    texts = [list(range(1, n + 1)) for n in lengths]
    batches = plan_packed(texts, row_lengths=(32, 64), tokens_per_batch=1024, max_segments=5, pad_id=0,
                          multiple_of=4)
    assert {b.ids.shape[1] for b in batches} == {32, 64}
    seen = []
    for b in batches:
        assert b.ids.shape[0] % 4 == 0
        for r in range(b.ids.shape[0]):
            members = [int(i) for i in b.rows[r] if i >= 0]
            assert len(members) <= 5
            offset = 0
            for s, i in enumerate(members):
                n = len(texts[i])
                assert (b.segments[r, offset:offset + n] == s + 1).all()
                assert (b.positions[r, offset:offset + n] == np.arange(n)).all()
                assert (b.ids[r, offset:offset + n] == texts[i]).all()
                offset += n
            assert (b.segments[r, offset:] == 0).all() and (b.ids[r, offset:] == 0).all()
            seen.extend(members)
    assert sorted(seen) == list(range(len(texts)))
    real = lengths.sum()
    padded = sum(b.ids.size for b in batches)
    assert real / padded > 0.85  # packing, not one text per row


def test_pack_rows_best_fit():
    # 10 + 6 fill one row of 16 exactly; 9 + 7 the other: two rows, not three.
    rows = pack_rows(np.array([10, 9, 7, 6]), row_lengths=(16,), max_segments=4)
    assert sorted(sorted(r) for _, r in rows) == [[0, 3], [1, 2]]
    # Longest first: 12 opens a 16-row (room 4); 5 does not fit, opens the shortest
    # row that holds it (8, room 3); 3 fits that exactly; 2 goes to the gap of 4.
    rows = pack_rows(np.array([12, 3, 2, 5]), row_lengths=(8, 16), max_segments=4)
    assert sorted((size, sorted(r)) for size, r in rows) == [(8, [1, 3]), (16, [0, 2])]
    with pytest.raises(ValueError, match="does not fit a packed row of 8"):
        pack_rows(np.array([9]), (4, 8), 4)


def test_pad_rows_gives_filler_rows_one_visible_token():
    ids, mask = pad_rows([[5, 6, 7], [8]], size=4, length=5, pad_id=1)
    assert ids.dtype == mask.dtype == np.int32
    assert ids.tolist() == [[5, 6, 7, 1, 1], [8, 1, 1, 1, 1], [1] * 5, [1] * 5]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_dispatch_ahead_collects_every_batch_in_order_two_batches_later():
    events = []

    def run(arrays):
        events.append(("run", arrays))
        return arrays * 10

    dispatch_ahead(((k, k) for k in range(5)), run, lambda key, out: events.append(("collect", key, out)))
    assert [e for e in events if e[0] == "collect"] == [("collect", k, 10 * k) for k in range(5)]
    # Batch i is collected only once batches i + 1 and i + 2 are on their way.
    assert events[:4] == [("run", 0), ("run", 1), ("run", 2), ("collect", 0, 0)]
    assert events.index(("collect", 2, 20)) == events.index(("run", 4)) + 1
