import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from umr_jax import sharding


def test_mesh_shapes(eight_devices):
    assert sharding.make_mesh((-1, 1)).shape == {"data": 8, "model": 1}
    assert sharding.make_mesh((4, 2)).shape == {"data": 4, "model": 2}
    assert sharding.make_mesh((-1, 2)).shape == {"data": 4, "model": 2}
    one = sharding.make_mesh((-1, 1), devices=jax.devices()[:1])
    assert one.shape == {"data": 1, "model": 1}


@pytest.mark.parametrize("shape,message", [
    ((3, -1), "not divisible by 3"),
    ((4, 4), "needs 16 devices"),
    ((-1, -1), "at most one"),
    ((0, 8), "positive"),
])
def test_impossible_mesh_is_rejected(eight_devices, shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_logical_rules_map_and_replicate_indivisible(eight_devices):
    mesh = sharding.make_mesh((4, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), (384, 1536), mesh) == P(None, "model")
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P("data", None)
    # 250,037 rows do not split in two: replicate instead of failing.
    assert sharding.logical_to_spec(("vocab", "embed"), (250037, 384), mesh) == P(None, None)
    # A mesh axis is used once per tensor.
    assert sharding.logical_to_spec(("heads", "mlp"), (12, 1536), mesh) == P("model", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_shard_batch_splits_leading_axis(eight_devices):
    mesh = sharding.make_mesh((4, 2))
    x = sharding.shard_batch(np.arange(32).reshape(8, 4), mesh)
    assert x.sharding.spec == P("data", None)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 4)}
    with pytest.raises(ValueError, match="not divisible by the data axis size 4"):
        sharding.shard_batch(np.zeros((6, 4)), mesh)
