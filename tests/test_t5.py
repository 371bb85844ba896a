"""mT5 / T5 in Flax against transformers' PyTorch reference, HF import/export and bad checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.models.mt5.modeling_mt5 import MT5Attention

from helpers import edit_config
from umr_jax.models.bert_weights import CheckpointError
from umr_jax.models.t5 import MT5, T5Config, relative_position_buckets, shift_right
from umr_jax.models.t5_weights import build_mt5, export_hf_weights, export_t5_hf, load_hf_weights, load_t5_checkpoint

TINY = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
ENC_LENGTHS = (24, 13, 5, 18)  # the longest beyond max_distance 20: the last bucket is used
DEC_LENGTHS = (9, 3, 6, 1)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random norm weights (init is all ones) and a strong position bias, so both are really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.mul_(10.0)
    return model.eval()


def tiny_torch_mt5(seed: int = 0, untie: bool = True, **overrides) -> transformers.MT5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**{**TINY, **overrides}))
    if untie:
        # transformers 5 forces tie_word_embeddings=True for mT5, so a model
        # built from a config shares lm_head with shared; released mT5
        # checkpoints (and what from_pretrained gives for them) have their own.
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(TINY["vocab_size"], TINY["d_model"]))
    return _perturb(model, seed)


def tiny_torch_t5_tied(seed: int = 3) -> transformers.T5ForConditionalGeneration:
    """Original-T5 layout: ReLU FFN, LM head tied to shared with the d_model**-0.5 output scaling."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**TINY, feed_forward_proj="relu", tie_word_embeddings=True)
    model = transformers.T5ForConditionalGeneration(cfg)
    assert model.config.scale_decoder_outputs
    return _perturb(model, seed)


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def batch(seed: int = 0, vocab: int = TINY["vocab_size"]):
    """Encoder and decoder batches with different lengths per row; labels padded with -100."""
    rng = np.random.default_rng(seed)

    def padded(lengths):
        mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int32)
        ids = rng.integers(2, vocab, size=mask.shape).astype(np.int32)
        return ids * mask, mask

    ids, mask = padded(ENC_LENGTHS)
    labels, label_mask = padded(DEC_LENGTHS)
    labels = np.where(label_mask > 0, labels, -100).astype(np.int32)
    return ids, mask, labels, label_mask


def torch_logits(model: torch.nn.Module, ids, mask, decoder_ids, decoder_mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
                    decoder_attention_mask=torch.tensor(decoder_mask))
    return out.logits.float().numpy()


@nnx.jit
def ours_logits(model: MT5, ids, mask, decoder_ids, decoder_mask) -> jax.Array:
    return model(ids, mask, decoder_ids, decoder_mask)


def mean_target_logprob(logits: np.ndarray, labels: np.ndarray, label_mask: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]
    return ((picked - logz) * label_mask).sum(-1) / label_mask.sum(-1)


def ours_from_torch(model: torch.nn.Module, **kwargs) -> MT5:
    cfg = T5Config.from_hf_dict(model.config.to_dict())
    ours = build_mt5(cfg, random_init=False, **kwargs)
    load_hf_weights(ours, torch_state(model), "torch reference")
    return ours


def assert_same_logits(ref: torch.nn.Module, ours: MT5, seed: int = 0) -> None:
    ids, mask, labels, label_mask = batch(seed)
    decoder_ids = shift_right(labels)
    expected = torch_logits(ref, ids, mask, decoder_ids, label_mask)
    got = np.asarray(ours_logits(ours, ids, mask, decoder_ids, label_mask))
    assert got.dtype == np.float32 and got.shape == expected.shape
    valid = label_mask > 0  # padded decoder positions are don't-cares
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(mean_target_logprob(got, labels, label_mask),
                               mean_target_logprob(expected, labels, label_mask), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ref() -> transformers.MT5ForConditionalGeneration:
    return tiny_torch_mt5()


@pytest.fixture(scope="module")
def ours(ref) -> MT5:
    return ours_from_torch(ref)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny fast tokenizer: export only needs something with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


# ----------------------------------------------------------------- parity


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(8, 20), (32, 128), (6, 7)])
def test_relative_position_buckets_match_transformers(bidirectional, buckets, distance):
    rel = np.arange(-700, 700)
    expected = MT5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                      num_buckets=buckets, max_distance=distance).numpy()
    np.testing.assert_array_equal(
        relative_position_buckets(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance),
        expected)


def test_logits_and_target_logprobs_match_transformers(ref, ours):
    assert ours.config.feed_forward_proj == "gated-gelu" and not ours.config.tie_word_embeddings
    assert_same_logits(ref, ours)


@nnx.jit
def _encode_decode(model: MT5, ids, mask, decoder_ids, decoder_mask):
    encoded = model.encode(ids, mask)
    hidden = model.decode(encoded, mask, decoder_ids, decoder_mask)
    return encoded, hidden, model.logits(hidden), hidden @ model.head_weight().T


def test_encode_decode_logits_compose_and_match_hf_hidden_states(ref, ours):
    ids, mask, labels, label_mask = batch(1)
    decoder_ids = shift_right(labels)
    encoded, hidden, logits, via_head_weight = _encode_decode(ours, ids, mask, decoder_ids, label_mask)
    assert encoded.shape == (*ids.shape, TINY["d_model"]) and hidden.shape == (*labels.shape, TINY["d_model"])
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
                  decoder_attention_mask=torch.tensor(label_mask))
    enc_valid, dec_valid = mask > 0, label_mask > 0
    np.testing.assert_allclose(np.asarray(encoded)[enc_valid], out.encoder_last_hidden_state.numpy()[enc_valid],
                               atol=1e-4, rtol=0)
    logits = np.asarray(logits)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits[dec_valid], out.logits.numpy()[dec_valid], atol=1e-4, rtol=0)
    # head_weight() is the same head as logits() (the teacher's chunked path uses it).
    np.testing.assert_allclose(np.asarray(via_head_weight), logits, atol=1e-5, rtol=0)
    assert ours.logit_softcap == 0.0


def test_shift_right_matches_transformers(ref):
    _, _, labels, _ = batch(2)
    expected = ref._shift_right(torch.tensor(labels, dtype=torch.long)).numpy()
    got = shift_right(labels)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(shift_right(jnp.asarray(labels), 5, 7))[:, 0], 5)
    assert (np.asarray(shift_right(jnp.asarray(labels), 5, 7)) != -100).all()


# Pairs of batch() packed two to a row (indices into ENC_LENGTHS / DEC_LENGTHS): the longest prompt
# (24 tokens, beyond max_distance) sits second, so its positions restart mid-row; pair 3 has a
# one-token target.
PACKED_ROWS = ([2, 0], [3, 1])


def pack(rows, sequences, length: int):
    """Token ids, segment numbers (1.. per sequence, 0 = padding) and positions restarting per sequence."""
    ids, segments, positions = (np.zeros((len(rows), length), np.int32) for _ in range(3))
    for r, members in enumerate(rows):
        offset = 0
        for s, i in enumerate(members):
            n = len(sequences[i])
            ids[r, offset:offset + n] = sequences[i]
            segments[r, offset:offset + n] = s + 1
            positions[r, offset:offset + n] = np.arange(n)
            offset += n
        assert offset < length  # some padding too
    return ids, segments, positions


@nnx.jit
def _packed_forward(model: MT5, ids, segments, positions, decoder_ids, decoder_segments, decoder_positions):
    encoded = model.encode(ids, None, segments=segments, positions=positions)
    hidden = model.decode(encoded, None, decoder_ids, None, encoder_segments=segments, segments=decoder_segments,
                          positions=decoder_positions)
    return encoded, model.logits(hidden)


def test_packed_rows_match_transformers_per_pair(ref, ours):
    ids, mask, labels, label_mask = batch(1)
    prompts = [ids[i, :n] for i, n in enumerate(ENC_LENGTHS)]
    targets = [labels[i, :n] for i, n in enumerate(DEC_LENGTHS)]
    # Each decoder segment restarts at the start token: the target shifted right on its own.
    decoder_inputs = [shift_right(t[None])[0] for t in targets]
    encoded, logits = _packed_forward(ours, *pack(PACKED_ROWS, prompts, 40), *pack(PACKED_ROWS, decoder_inputs, 16))
    encoded, logits = np.asarray(encoded), np.asarray(logits)
    decoder_ids = shift_right(labels)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
                  decoder_attention_mask=torch.tensor(label_mask))
    unpacked = np.asarray(ours_logits(ours, ids, mask, decoder_ids, label_mask))
    checked = 0
    for r, members in enumerate(PACKED_ROWS):
        e = d = 0
        for i in members:
            n, m = ENC_LENGTHS[i], DEC_LENGTHS[i]
            np.testing.assert_allclose(encoded[r, e:e + n], out.encoder_last_hidden_state.numpy()[i, :n], atol=1e-4,
                                       rtol=0, err_msg=f"encoder states of pair {i}")
            np.testing.assert_allclose(logits[r, d:d + m], out.logits.numpy()[i, :m], atol=1e-4, rtol=0,
                                       err_msg=f"logits of pair {i}")
            np.testing.assert_allclose(logits[r, d:d + m], unpacked[i, :m], atol=2e-5, rtol=0)
            np.testing.assert_allclose(
                mean_target_logprob(logits[r, d:d + m][None], targets[i][None], np.ones((1, m))),
                mean_target_logprob(out.logits.numpy()[i:i + 1, :m], targets[i][None], np.ones((1, m))),
                atol=1e-4, rtol=0)
            e, d, checked = e + n, d + m, checked + 1
    assert checked == len(ENC_LENGTHS)
    # The segments matter: read as one sequence, the row gives the long prompt other states.
    row_ids, row_segments, _ = pack(PACKED_ROWS, prompts, 40)
    merged = np.asarray(ours.encode(jnp.asarray(row_ids), jnp.asarray(row_segments > 0)))
    assert np.abs(merged[0, 5:29] - out.encoder_last_hidden_state.numpy()[0, :24]).max() > 1e-2


def test_bfloat16_compute_keeps_float32_logits(ref, ours):
    low = ours_from_torch(ref, dtype="bfloat16")
    ids, mask, labels, label_mask = batch(0)
    decoder_ids = shift_right(labels)
    full = np.asarray(ours_logits(ours, ids, mask, decoder_ids, label_mask))
    half = np.asarray(ours_logits(low, ids, mask, decoder_ids, label_mask))
    assert half.dtype == np.float32 and np.isfinite(half).all()
    np.testing.assert_allclose(mean_target_logprob(half, labels, label_mask),
                               mean_target_logprob(full, labels, label_mask), atol=0.1, rtol=0)


def test_dropout_only_in_training_mode(ours):
    # The encoder only: compiling a training-mode program (a random mask per
    # dropout site) is slow on a CPU, and the decoder's layers pass
    # `deterministic` the same way (the eval path already runs them).
    ids, mask, _, _ = batch(0)
    encode = nnx.jit(lambda m, ids, mask, deterministic: m.encode(ids, mask, deterministic=deterministic),
                     static_argnames="deterministic")
    eval_a = np.asarray(encode(ours, ids, mask, True))
    eval_b = np.asarray(encode(ours, ids, mask, True))
    train_a = np.asarray(encode(ours, ids, mask, False))
    train_b = np.asarray(encode(ours, ids, mask, False))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert np.isfinite(train_a).all()
    assert np.abs(train_a - eval_a).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3  # a fresh mask per call


def test_tied_t5_variant_matches_transformers(tmp_path, tokenizer):
    ref = tiny_torch_t5_tied()
    ref.save_pretrained(tmp_path / "t5")
    ckpt = load_t5_checkpoint(str(tmp_path / "t5"))
    assert ckpt.config.tie_word_embeddings and ckpt.config.feed_forward_proj == "relu"
    ours = build_mt5(ckpt.config, random_init=False)
    load_hf_weights(ours, ckpt.weights, ckpt.description)
    assert ours.lm_head is None
    assert_same_logits(ref, ours, seed=3)
    # Exported as model_type 't5' (transformers 5's MT5 never scales) and loaded back.
    out = export_t5_hf(ours, tokenizer, str(tmp_path / "export"))
    back, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert back.config.scale_decoder_outputs
    assert_same_logits(back.eval(), ours, seed=4)


def test_mt5_saved_with_tied_head_uses_shared_unscaled(tmp_path):
    # An mT5 built from a config in transformers 5 shares lm_head and
    # shared.weight; save_pretrained then writes no lm_head.weight.
    ref = tiny_torch_mt5(seed=5, untie=False)
    ref.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    ckpt = load_t5_checkpoint(str(tmp_path / "tied"))
    assert not ckpt.config.tie_word_embeddings
    ours = build_mt5(ckpt.config, random_init=False)
    load_hf_weights(ours, ckpt.weights, ckpt.description)
    assert_same_logits(ref, ours, seed=5)


# ------------------------------------------------------- import and export


def test_import_export_round_trip_through_transformers(tmp_path, ref, tokenizer):
    ref.save_pretrained(tmp_path / "hf")  # config.json (tie_word_embeddings: true!) + model.safetensors
    ckpt = load_t5_checkpoint(str(tmp_path / "hf"))
    assert ckpt.config == T5Config(**TINY) and ckpt.tokenizer_source == str(tmp_path / "hf")
    ours = build_mt5(ckpt.config, random_init=False)
    load_hf_weights(ours, ckpt.weights, ckpt.description)
    assert_same_logits(ref, ours, seed=6)

    out = export_t5_hf(ours, tokenizer, str(tmp_path / "export"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    back, info = transformers.MT5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    expected = torch_state(ref)
    got = torch_state(back)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert_same_logits(back.eval(), ours, seed=7)
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 0
    # And our own reader reads our export back to the same config.
    assert load_t5_checkpoint(out).config == ours.config


def test_import_sharded_pytorch_bin_with_aliases(tmp_path, ref):
    # Older checkpoints: pytorch_model.bin shards, the embed_tokens aliases and
    # an unused cross-attention bias table.
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    directory = tmp_path / "bin"
    os.makedirs(directory)
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, directory / file)
    with open(directory / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
    ref.config.save_pretrained(directory)
    ckpt = load_t5_checkpoint(str(directory))
    ours = build_mt5(ckpt.config, random_init=False)
    load_hf_weights(ours, ckpt.weights, ckpt.description)
    assert_same_logits(ref, ours, seed=8)
    assert "encoder.embed_tokens.weight" not in export_hf_weights(ours)


# ------------------------------------------------------------------ errors


@pytest.fixture
def hf_dir(tmp_path, ref):
    ref.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def _edit_weights(directory: str, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


def _load(directory: str) -> None:
    ckpt = load_t5_checkpoint(directory)
    load_hf_weights(build_mt5(ckpt.config, random_init=False), ckpt.weights, ckpt.description)


def test_wrong_model_type_names_the_file(hf_dir):
    edit_config(hf_dir, model_type="bert")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'bert' is not an encoder-decoder"):
        load_t5_checkpoint(hf_dir)


def test_unsupported_activation_names_the_file(hf_dir):
    edit_config(hf_dir, feed_forward_proj="gated-tanh-x")
    with pytest.raises(CheckpointError, match=r"config\.json: feed_forward_proj 'gated-tanh-x'"):
        load_t5_checkpoint(hf_dir)


def test_missing_tensor_is_named(hf_dir):
    _edit_weights(hf_dir, lambda w: w.pop("decoder.block.2.layer.1.layer_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder\.block\.2\.layer\.1\.layer_norm"):
        _load(hf_dir)


def test_extra_layers_are_unexpected(hf_dir):
    edit_config(hf_dir, num_decoder_layers=2)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['decoder\.block\.2.*num_decoder_layers 2"):
        _load(hf_dir)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    edit_config(hf_dir, d_ff=64)
    with pytest.raises(CheckpointError,
                       match=r"'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight' has shape \(48, 32\)"
                             r".*expects \(64, 32\)"):
        _load(hf_dir)


def test_gated_config_with_relu_weights_is_caught(hf_dir):
    edit_config(hf_dir, feed_forward_proj="relu")
    with pytest.raises(CheckpointError,
                       match=r"missing tensors .*DenseReluDense\.wi\.weight.*feed_forward_proj 'relu'"):
        _load(hf_dir)


def test_alias_that_differs_from_shared(hf_dir):
    _edit_weights(hf_dir, lambda w: w.update({"decoder.embed_tokens.weight": w["shared.weight"] + 1}))
    with pytest.raises(CheckpointError, match=r"'decoder\.embed_tokens\.weight' differs from 'shared\.weight'"):
        _load(hf_dir)


def test_tied_config_with_separate_head(hf_dir):
    edit_config(hf_dir, model_type="t5", scale_decoder_outputs=True)
    with pytest.raises(CheckpointError, match=r"ties the LM head .* different 'lm_head\.weight'"):
        _load(hf_dir)


def test_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError,
                       match=r"could not fetch 'google/mt5-small'.*local directory.*--config\.teacher\.checkpoint"):
        load_t5_checkpoint("google/mt5-small")


def test_neither_directory_nor_hub_id():
    with pytest.raises(CheckpointError, match="no such directory, and not a hub id"):
        load_t5_checkpoint("/does/not/exist")


def test_config_validation():
    with pytest.raises(ValueError, match="relative_attention_num_buckets must be >= 4"):
        T5Config(**{**TINY, "relative_attention_num_buckets": 2})
    with pytest.raises(ValueError, match="not of the form"):
        T5Config(**{**TINY, "feed_forward_proj": "a-b-c"})
    assert T5Config(**{**TINY, "num_decoder_layers": None}).num_decoder_layers == TINY["num_layers"]
    assert T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert T5Config(feed_forward_proj="gelu").dense_act_fn == "gelu"
    hf = T5Config(**TINY).to_hf_dict()
    assert hf["model_type"] == "mt5" and hf["architectures"] == ["MT5ForConditionalGeneration"]
    assert T5Config.from_hf_dict(hf) == T5Config(**TINY)


def test_scanned_blocks_give_the_unrolled_logits():
    """teacher.scan_layers: each stack's blocks after the first (which owns the position table) as one
    lax.scan; the teacher-forced logits are those of the unrolled loop."""
    from umr_jax.models.layers import set_scan_layers
    model = build_mt5(T5Config(**{**TINY, "num_layers": 3, "num_decoder_layers": 4}), seed=2)
    rng = np.random.default_rng(0)
    ids, dec = (jnp.array(rng.integers(1, 128, shape)) for shape in ((2, 9), (2, 5)))
    mask, dec_mask = jnp.ones((2, 9), jnp.int32).at[0, 6:].set(0), jnp.ones((2, 5), jnp.int32)
    run = nnx.jit(lambda m, *a: m(*a, deterministic=True))
    unrolled = run(model, ids, mask, dec, dec_mask)
    set_scan_layers(model, True)
    assert model.encoder.scan_layers and model.decoder.scan_layers
    np.testing.assert_allclose(run(model, ids, mask, dec, dec_mask), unrolled, atol=1e-5)
