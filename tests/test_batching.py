import numpy as np
import pytest

from umr_jax.batching import batch_rows_for, plan_batches


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
