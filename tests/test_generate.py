"""Our JAX decoding (KV cache, greedy and beam search) against transformers' ``generate``, token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_gemma import ours_from_torch as gemma_from_torch
from test_gemma import padded_batch, tiny_torch_gemma
from test_t5 import batch as t5_batch
from test_t5 import ours_from_torch as t5_from_torch
from test_t5 import tiny_torch_mt5

from umr_jax import generate as gen
from umr_jax import sharding

NEW_TOKENS = 12  # beyond the tiny Gemma's sliding window (8) for the short prompts
_generate = nnx.jit(gen.generate, static_argnums=3)


def left_pad(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' batched decoder-only prompts: the same rows, padding on the left."""
    lengths = mask.sum(1)
    width = ids.shape[1]
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row, n in enumerate(lengths):
        left_ids[row, width - n:] = ids[row, :n]
        left_mask[row, width - n:] = 1
    return left_ids, left_mask


def until_eos(tokens, eos_ids) -> list[list[int]]:
    """Each row's tokens up to and including its first end-of-sequence."""
    rows = []
    for row in np.asarray(tokens).tolist():
        end = next((i for i, t in enumerate(row) if t in eos_ids), len(row) - 1)
        rows.append(row[: end + 1])
    return rows


def hf_generate(ref, ids, mask, settings: gen.SearchSettings, decoder_only: bool):
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=settings.num_beams,
                  length_penalty=settings.length_penalty, early_stopping=settings.early_stopping,
                  eos_token_id=list(settings.eos_ids), pad_token_id=settings.pad_id, return_dict_in_generate=True,
                  output_scores=True)
    if settings.banned_bigram:
        kwargs["bad_words_ids"] = [list(settings.banned_bigram)]
    if decoder_only:
        ids, mask = left_pad(ids, mask)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           **kwargs)
    new = out.sequences[:, ids.shape[1] if decoder_only else 1:].numpy()
    scores = out.sequences_scores.numpy() if settings.num_beams > 1 else None
    return until_eos(new, settings.eos_ids), scores


def assert_same_generation(ref, ours, ids, mask, settings: gen.SearchSettings, decoder_only: bool) -> None:
    expected, expected_scores = hf_generate(ref, ids, mask, settings, decoder_only)
    got = _generate(ours, jnp.asarray(ids), jnp.asarray(mask), settings)
    assert until_eos(got.tokens, settings.eos_ids) == expected
    np.testing.assert_array_equal(np.asarray(got.lengths), [len(r) for r in expected])
    tokens = np.asarray(got.tokens)
    for row, n in enumerate(np.asarray(got.lengths)):  # nothing but padding after the end
        assert (tokens[row, n:] == settings.pad_id).all()
    if expected_scores is not None:
        np.testing.assert_allclose(np.asarray(got.scores), expected_scores, rtol=1e-4, atol=1e-4)
    # The end-of-sequence path must be exercised: some rows stop early, some run to the limit.
    lengths = [len(r) for r in expected]
    assert min(lengths) < settings.max_new_tokens, lengths


def frequent_tokens(ours, ids, mask, count: int) -> tuple[int, ...]:
    """End-of-sequence ids that the random model does produce early in some rows (so rows end at
    different steps): the second new token of the first `count` rows of an unstoppable greedy run."""
    never = gen.SearchSettings(NEW_TOKENS, eos_ids=(ours.config.vocab_size - 1,), pad_id=0)
    tokens = np.asarray(_generate(ours, jnp.asarray(ids), jnp.asarray(mask), never).tokens)
    return tuple(sorted({int(t) for t in tokens[:count, 1]}))


# ---------------------------------------------------------------- Gemma 3 (decoder-only)


@pytest.fixture(scope="module")
def gemma():
    ref = tiny_torch_gemma(seed=2)
    ours = gemma_from_torch(ref)
    ids, mask = padded_batch(seed=2, lengths=(24, 17, 9, 3, 12))
    return ref, ours, ids, mask, frequent_tokens(ours, ids, mask, 4)


@pytest.mark.parametrize("beams,penalty,early", [(1, 1.0, False), (3, 1.0, False), (3, 0.0, "never"),
                                                 (4, 2.0, True)])
def test_gemma_matches_transformers_generate(gemma, beams, penalty, early):
    ref, ours, ids, mask, eos = gemma
    settings = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0, num_beams=beams, length_penalty=penalty,
                                early_stopping=early)
    assert_same_generation(ref, ours, ids, mask, settings, decoder_only=True)


def test_gemma_cached_prefill_equals_full_forward(gemma):
    """The cache path's states are the plain forward's: prompt, then token by token."""
    _, ours, ids, mask, _ = gemma
    full = np.asarray(nnx.jit(lambda m, i, k: m.hidden_states(i, k))(ours, jnp.asarray(ids), jnp.asarray(mask)))

    @nnx.jit
    def incremental(model, ids):
        cache = model.init_cache(ids.shape[0], ids.shape[1])
        head, cache = model.hidden_states_cached(ids[:, :5], jnp.zeros((ids.shape[0],), jnp.int32), cache)
        states = [head]
        for t in range(5, ids.shape[1]):
            state, cache = model.hidden_states_cached(ids[:, t:t + 1], jnp.full((ids.shape[0],), t), cache)
            states.append(state)
        return jnp.concatenate(states, axis=1)

    got = np.asarray(incremental(ours, jnp.asarray(ids)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=2e-5)


def test_banned_bigram_matches_transformers_bad_words(gemma):
    ref, ours, ids, mask, eos = gemma
    # Ban what greedy picks second in row 0 after what it picks first: the path must change.
    never = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0)
    first = np.asarray(_generate(ours, jnp.asarray(ids), jnp.asarray(mask), never).tokens)[0, :2]
    for beams in (1, 3):
        settings = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0, num_beams=beams,
                                    banned_bigram=(int(first[0]), int(first[1])))
        assert_same_generation(ref, ours, ids, mask, settings, decoder_only=True)


@pytest.mark.parametrize("mesh_shape", [(4, 2), (1, 8)])
def test_sharded_generation_on_eight_devices_matches(eight_devices, gemma, mesh_shape):
    """The reader's program (compile_generate) gives the one-device tokens on a data x model mesh
    and on a weights-only split (read.mesh_shape's default)."""
    _, _, ids, mask, eos = gemma
    ours = gemma_from_torch(tiny_torch_gemma(seed=2))
    ids, mask = np.concatenate([ids] * 2)[:8], np.concatenate([mask] * 2)[:8]
    settings = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0, num_beams=2)
    single = _generate(ours, jnp.asarray(ids), jnp.asarray(mask), settings)
    mesh = sharding.make_mesh(mesh_shape)
    sharding.shard_module(ours, mesh)
    program = gen.compile_generate(ours, settings, mesh)
    sharded = program(nnx.split(ours)[1], *sharding.shard_batch((ids, mask), mesh))
    assert sharded.tokens.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.scores), np.asarray(single.scores), atol=1e-5)


# ---------------------------------------------------------------- mT5 (encoder-decoder)


@pytest.fixture(scope="module")
def mt5():
    # transformers 5's encoder-decoder cache has num_layers entries, so its
    # generate fails for num_decoder_layers > num_layers: parity uses equal stacks.
    ref = tiny_torch_mt5(seed=1, num_decoder_layers=2)
    ours = t5_from_torch(ref)
    ids, mask = t5_batch(seed=1)[:2]
    return ref, ours, ids, mask, frequent_tokens(ours, ids, mask, 4)


@pytest.mark.parametrize("beams,penalty,early,banned", [(1, 1.0, False, None), (4, 1.0, False, (0, 0)),
                                                        (3, 0.5, True, None)])
def test_mt5_matches_transformers_generate(mt5, beams, penalty, early, banned):
    ref, ours, ids, mask, eos = mt5
    settings = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0, num_beams=beams, length_penalty=penalty,
                                early_stopping=early, banned_bigram=banned)
    assert_same_generation(ref, ours, ids, mask, settings, decoder_only=False)


def test_sharded_mt5_generation_matches(eight_devices, mt5):
    _, ours, ids, mask, eos = mt5
    ours = nnx.clone(ours)
    ids, mask = np.concatenate([ids] * 8)[:8], np.concatenate([mask] * 8)[:8]
    settings = gen.SearchSettings(NEW_TOKENS, eos_ids=eos, pad_id=0, num_beams=3)
    single = _generate(ours, jnp.asarray(ids), jnp.asarray(mask), settings)
    mesh = sharding.make_mesh((1, 8))
    sharding.shard_module(ours, mesh)
    sharded = gen.compile_generate(ours, settings, mesh)(nnx.split(ours)[1], *sharding.shard_batch((ids, mask), mesh))
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.scores), np.asarray(single.scores), atol=1e-5)


def test_settings_are_checked():
    for bad in (dict(max_new_tokens=0), dict(num_beams=0), dict(eos_ids=()), dict(early_stopping="soon")):
        with pytest.raises(ValueError):
            gen.SearchSettings(**{**dict(max_new_tokens=4, eos_ids=(1,), pad_id=0), **bad})
    with pytest.raises(TypeError, match="Gemma3 and MT5"):
        gen.generate(object(), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                   gen.SearchSettings(4, eos_ids=(1,), pad_id=0))


def test_jit_compiles_once_per_shape(gemma):
    _, ours, ids, mask, eos = gemma
    settings = gen.SearchSettings(4, eos_ids=eos, pad_id=0)
    fn = jax.jit(lambda state, i, m: gen.generate(nnx.merge(graphdef, state), i, m, settings))
    graphdef, state = nnx.split(ours)
    fn(state, jnp.asarray(ids), jnp.asarray(mask))
    fn(state, jnp.asarray(ids[::-1].copy()), jnp.asarray(mask[::-1].copy()))
    assert fn._cache_size() == 1
