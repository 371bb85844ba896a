"""Our Flax BERT against transformers' PyTorch BertModel on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ours_from_torch, padded_batch, tiny_torch_bert, torch_pooled
from umr_jax import sharding
from umr_jax.models.bert import BertConfig, BertEncoder, DualEncoder


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", False), ("mean", True)])
def test_parity_with_transformers(pooling, normalize):
    ref = tiny_torch_bert()
    ours = ours_from_torch(ref, pooling=pooling, normalize=normalize)
    ids, mask = padded_batch()
    expected = torch_pooled(ref, ids, mask, pooling, normalize)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Padding must not leak: a row alone, unpadded, gives the same embedding.
    n = int(mask[3].sum())
    alone = np.asarray(ours(jnp.asarray(ids[3:4, :n]), jnp.asarray(mask[3:4, :n])))
    np.testing.assert_allclose(alone[0], got[3], atol=1e-5)


def test_token_states_match_transformers():
    import torch
    ref = tiny_torch_bert(seed=3, hidden_act="gelu_new")
    ours = ours_from_torch(ref)
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        h = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(ours.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], h[valid], atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close():
    ref = tiny_torch_bert()
    ours = ours_from_torch(ref, dtype="bfloat16")
    ids, mask = padded_batch()
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.dtype == np.float32  # pooled output in float32 whatever the compute dtype
    expected = torch_pooled(ref, ids, mask)
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() > 0.995


def test_bfloat16_params():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    m = BertEncoder(cfg, param_dtype="bfloat16", dtype="bfloat16", rngs=nnx.Rngs(0))
    assert m.layers[0].ffn.wi.get_value().dtype == jnp.bfloat16
    ids, mask = padded_batch(batch=2, length=8, vocab=50)
    assert np.isfinite(np.asarray(m(jnp.asarray(ids), jnp.asarray(mask)))).all()
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        BertEncoder(cfg, dtype="float8", rngs=nnx.Rngs(0))


def test_dropout_only_when_training():
    ref = tiny_torch_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ours = ours_from_torch(ref)
    ids, mask = padded_batch()
    a = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), deterministic=True))
    b = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), deterministic=True))
    np.testing.assert_array_equal(a, b)
    c = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), deterministic=False))
    d = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), deterministic=False))
    assert np.abs(c - a).max() > 1e-3 and np.abs(c - d).max() > 1e-3


def test_towers_separate_or_shared():
    ref = tiny_torch_bert()
    separate = DualEncoder(ours_from_torch(ref), ours_from_torch(ref))
    assert not separate.shared
    separate.query.layers[0].ffn.bo.set_value(separate.query.layers[0].ffn.bo.get_value() + 1.0)
    assert float(jnp.abs(separate.passage.layers[0].ffn.bo.get_value()
                         - separate.query.layers[0].ffn.bo.get_value()).max()) == pytest.approx(1.0)
    shared = DualEncoder(ours_from_torch(ref))
    assert shared.shared and shared.passage is shared.query
    # One set of parameters in the state, not two.
    n_shared = sum(x.size for x in jax.tree.leaves(nnx.state(shared, nnx.Param)))
    n_separate = sum(x.size for x in jax.tree.leaves(nnx.state(separate, nnx.Param)))
    assert n_separate == 2 * n_shared


def test_sharded_equals_unsharded(eight_devices):
    ref = tiny_torch_bert(vocab_size=128)  # vocab divisible by 2: really split over `model`
    ids, mask = padded_batch(batch=8, vocab=128)
    single = ours_from_torch(ref)
    expected = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))

    model = ours_from_torch(ref)
    mesh = sharding.make_mesh((4, 2))
    shardings = sharding.shard_module(model, mesh)
    assert model.layers[0].ffn.wi.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert model.embeddings.word.get_value().sharding.spec == jax.sharding.PartitionSpec("model", None)
    graphdef, state = nnx.split(model)
    batch = sharding.batch_sharding(mesh, 2)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m), in_shardings=(shardings, batch, batch),
                 out_shardings=batch)
    out = fn(state, *sharding.shard_batch((ids, mask), mesh))
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert len(out.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        BertConfig(vocab_size=10, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unsupported hidden_act"):
        BertConfig(vocab_size=10, hidden_size=32, num_attention_heads=4, hidden_act="swish")
    cfg = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8)
    with pytest.raises(ValueError, match="unknown pooling"):
        BertEncoder(cfg, pooling="max", rngs=nnx.Rngs(0))


def test_packed_rows_equal_one_text_per_row():
    from umr_jax.batching import plan_packed
    ref = tiny_torch_bert(seed=5)
    for pooling in ("mean", "cls"):
        ours = ours_from_torch(ref, pooling=pooling, normalize=True)
        rng = np.random.default_rng(0)
        texts = [rng.integers(5, 101, size=n).tolist() for n in rng.integers(1, 20, size=13)]
        batches = plan_packed(texts, row_lengths=(12, 24), tokens_per_batch=96, max_segments=6, pad_id=0)
        assert any((b.rows >= 0).sum(1).max() > 1 for b in batches)  # really packed
        got = np.zeros((len(texts), 32), np.float32)
        for b in batches:
            out = np.asarray(ours.packed(jnp.asarray(b.ids), jnp.asarray(b.segments), jnp.asarray(b.positions), 6))
            keep = b.rows >= 0
            got[b.rows[keep]] = out[keep]
        for i, t in enumerate(texts):
            ids = np.asarray([t], np.int32)
            expected = torch_pooled(ref, ids, np.ones_like(ids), pooling, normalize=True)[0]
            np.testing.assert_allclose(got[i], expected, atol=1e-4, rtol=0)


def test_scanned_layers_give_the_unrolled_encoding_and_training_stays_unrolled():
    """retriever.scan_layers: blocks 2..n as one lax.scan give the same embeddings (inference); with dropout
    on (training) the loop runs unrolled, so each layer keeps its own dropout mask."""
    from umr_jax.models.layers import set_scan_layers
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.5)
    model = BertEncoder(config, rngs=nnx.Rngs(params=0, dropout=1))
    ids = jnp.array(np.random.default_rng(0).integers(1, 64, (3, 12)))
    mask = jnp.ones((3, 12), jnp.int32).at[1, 7:].set(0)
    run = nnx.jit(lambda m, i, k, d: m(i, k, deterministic=d), static_argnums=3)
    unrolled = run(model, ids, mask, True)

    def program(deterministic: bool) -> str:
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, mask, deterministic=deterministic))(state))

    assert "scan" not in program(True)
    set_scan_layers(model, True)
    np.testing.assert_allclose(run(model, ids, mask, True), unrolled, atol=1e-6)
    assert "scan" in program(True) and "scan" not in program(False)
