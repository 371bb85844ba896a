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


def _per_device_bytes(model) -> tuple[dict, int, int]:
    """Bytes of `model`'s parameters on each device, their total, and the bytes of the replicated ones."""
    from flax import nnx
    per_device: dict = {}
    total = replicated = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        assert isinstance(value, jax.Array), "a parameter was left unloaded"
        total += value.nbytes
        if value.sharding.is_fully_replicated:
            replicated += value.nbytes
        for shard in value.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device, total, replicated


@pytest.mark.parametrize("family", ["mt5", "gemma3", "bert"])
def test_checkpoints_load_straight_into_their_shards(eight_devices, family):
    """A checkpoint loaded on a (2 data x 4 model) mesh: before loading no matrix is on any device (host
    placeholders), after it each device holds only its shards, ~1/4 of the bytes, and the values are the
    checkpoint's."""
    from flax import nnx

    from umr_jax.models import bert_weights, gemma_weights, t5_weights
    from umr_jax.models.bert import BertConfig, BertEncoder
    from umr_jax.models.gemma import Gemma3Config
    from umr_jax.models.t5 import T5Config

    if family == "mt5":
        config = T5Config(vocab_size=256, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                          num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20)
        build, weights_module = (lambda init: t5_weights.build_mt5(config, seed=1, random_init=init)), t5_weights
    elif family == "gemma3":
        config = Gemma3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=8,
                              sliding_window=16)
        build, weights_module = (lambda init: gemma_weights.build_gemma(config, seed=1, random_init=init)), \
            gemma_weights
    else:
        config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        build, weights_module = (lambda init: BertEncoder(config, rngs=nnx.Rngs(1), random_init=init)), bert_weights
    source = build(True)
    weights = weights_module.export_hf_weights(source)
    target = build(False)
    on_device = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(target, nnx.Param))
                 if isinstance(v.get_value(), jax.Array)]
    assert max(x.size for x in on_device) <= 64  # norm scales and biases only: every matrix is a host placeholder
    mesh = sharding.make_mesh((2, 4), ("data", "model"))
    weights_module.load_hf_weights(target, weights, "test checkpoint", sharding.placement(mesh))
    per_device, total, replicated = _per_device_bytes(target)
    assert len(per_device) == 8 and replicated < 0.1 * total, (replicated, total)  # norms, biases, positions
    for device, size in per_device.items():
        assert size <= total / 4 + replicated, (device, size, total)
    np.testing.assert_equal(weights_module.export_hf_weights(target), weights)
