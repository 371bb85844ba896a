"""Our Flax Gemma 3 against transformers' PyTorch Gemma3ForCausalLM, GGUF import, and bad checkpoints.

The real-model test loads the packaged gemma-3-270m GGUF twice (our reader and
transformers' ``gguf_file=``) and compares target-token log-probabilities.
"""

import dataclasses
import json
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import edit_config, perturb_norms, torch_state
from umr_jax import sharding
from umr_jax.models import gemma_weights
from umr_jax.models.bert_weights import CheckpointError
from umr_jax.models.gemma import Gemma3Config, attention_bias, layer_indices
from umr_jax.models.gemma_weights import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    build_gemma,
    export_hf_weights,
    load_gemma_checkpoint,
    load_hf_weights,
    read_gguf,
)

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=64,
            query_pre_attn_scalar=16, layer_types=LAYER_TYPES, initializer_range=0.1)


def tiny_torch_gemma(seed: int = 0, **overrides) -> transformers.Gemma3ForCausalLM:
    """A random Gemma 3 with non-trivial norm weights (zero would hide a wrong 1 + w)."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    return perturb_norms(transformers.Gemma3ForCausalLM(config).eval(), "norm", 0.3)


def ours_from_torch(model: transformers.Gemma3ForCausalLM, **kwargs):
    cfg = Gemma3Config.from_hf_dict(model.config.to_dict())
    ours = build_gemma(cfg, random_init=False, **kwargs)
    load_hf_weights(ours, torch_state(model), "torch reference")
    return ours


def padded_batch(seed: int = 0, lengths=(24, 17, 9, 3), vocab: int = 256):
    """Right-padded random ids; the rows are longer and shorter than the sliding window (8)."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = rng.integers(4, vocab, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask)).logits.float().numpy()


# ---------------------------------------------------------------- tiny parity


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_logits_match_transformers(kv_heads):
    ref = tiny_torch_gemma(num_key_value_heads=kv_heads)
    ours = ours_from_torch(ref)
    ids, mask = padded_batch()
    expected = torch_logits(ref, ids, mask)
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.dtype == np.float32 and got.shape == (4, 24, 256)
    valid = mask.astype(bool)
    diff = np.abs(got[valid] - expected[valid]).max()
    print(f"tiny parity kv_heads={kv_heads}: max |logit diff| {diff:.2e} (logits up to "
          f"{np.abs(expected[valid]).max():.2f})")
    assert diff < 1e-4
    # Padding must not leak: a row alone, unpadded, gives the same logits.
    n = int(mask[2].sum())
    alone = np.asarray(_forward(ours, jnp.asarray(ids[2:3, :n]), jnp.asarray(mask[2:3, :n])))
    np.testing.assert_allclose(alone[0], got[2, :n], atol=1e-5)
    # hidden_states + logits is the forward pass the scorer uses.
    hidden = ours.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (4, 24, 64)
    np.testing.assert_allclose(np.asarray(ours.logits(hidden))[valid], got[valid], atol=1e-5)


def test_linear_rope_scaling_and_final_softcap_match_transformers():
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    ref = tiny_torch_gemma(seed=1, rope_parameters=rope, final_logit_softcapping=2.0)
    ours = ours_from_torch(ref)
    assert ours.config.rope_scaling_factor == 8.0 and ours.logit_softcap == 2.0
    ids, mask = padded_batch(seed=1)
    valid = mask.astype(bool)
    expected = torch_logits(ref, ids, mask)
    assert np.abs(expected[valid]).max() < 2.0  # the cap is active
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got[valid] - expected[valid]).max() < 1e-4


def test_sliding_window_is_the_last_window_positions_including_itself():
    mask = jnp.ones((1, 12), jnp.int32).at[0, 10:].set(0)
    bias = np.asarray(attention_bias(mask, 4))[0, 0, 0]
    visible = bias == 0
    for q in range(12):
        expected = [k for k in range(12) if q - 4 < k <= q and k < 10]
        assert np.flatnonzero(visible[q]).tolist() == expected
    full = np.asarray(attention_bias(mask, None))[0, 0, 0] == 0
    assert np.flatnonzero(full[9]).tolist() == list(range(10))


def test_export_round_trip_equals_torch_state_dict():
    ref = tiny_torch_gemma(seed=2)
    exported = export_hf_weights(ours_from_torch(ref))
    state = torch_state(ref)
    assert set(exported) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_bfloat16_compute_stays_close():
    ref = tiny_torch_gemma(seed=3)
    ours = ours_from_torch(ref, dtype="bfloat16", param_dtype="bfloat16")
    assert ours.layers[0].ffn.gate.get_value().dtype == jnp.bfloat16
    ids, mask = padded_batch(seed=3)
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.dtype == np.float32  # logits in float32 whatever the compute dtype
    valid = mask.astype(bool)
    expected = jax.nn.log_softmax(torch_logits(ref, ids, mask)[valid])
    assert np.abs(np.asarray(jax.nn.log_softmax(got[valid])) - np.asarray(expected)).max() < 0.1


def test_sharded_on_eight_devices_matches(eight_devices):
    ref = tiny_torch_gemma(seed=4)
    ours = ours_from_torch(ref)
    ids, mask = padded_batch(seed=4)
    single = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    mesh = sharding.make_mesh((2, 4))
    sharding.shard_module(ours, mesh)
    assert ours.layers[0].attention.q_kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
        None, "model", None)
    batch = sharding.shard_batch((ids, mask), mesh)
    np.testing.assert_allclose(np.asarray(_forward(ours, *batch)), single, atol=1e-5)


# ---------------------------------------------------------------- configs and HF directories


def test_config_from_old_format_and_errors():
    cfg = Gemma3Config.from_hf_dict({
        "model_type": "gemma3_text", "vocab_size": 10, "num_hidden_layers": 12, "sliding_window_pattern": 6,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "eos_token_id": [1, 106]})
    assert layer_indices(cfg, "full_attention") == [5, 11]
    assert cfg.rope_scaling_factor == 8.0 and cfg.eos_token_id == (1, 106)
    # Our dict is what transformers builds the same model from.
    hf = transformers.Gemma3TextConfig(**cfg.to_hf_dict())
    assert Gemma3Config.from_hf_dict(hf.to_dict()) == cfg
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        Gemma3Config.from_hf_dict({"vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        Gemma3Config(vocab_size=10, num_hidden_layers=3, layer_types=("full_attention",) * 2)


def test_hf_directory_text_and_multimodal(tmp_path):
    ref = tiny_torch_gemma(seed=5)
    ref.save_pretrained(tmp_path / "text")
    ids, mask = padded_batch(seed=5)
    valid = mask.astype(bool)
    expected = torch_logits(ref, ids, mask)[valid]

    def check(ckpt):
        model = build_gemma(ckpt.config, random_init=False)
        load_hf_weights(model, ckpt.weights, ckpt.description)
        got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))[valid]
        assert np.abs(got - expected).max() < 1e-4

    check(load_gemma_checkpoint(str(tmp_path / "text")))
    # A Gemma3ForConditionalGeneration layout: nested text_config, prefixed
    # language model, a vision tower we skip.
    from safetensors.numpy import save_file
    os.makedirs(tmp_path / "mm")
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in torch_state(ref).items()
             if k != "lm_head.weight"}
    state["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
    save_file(state, str(tmp_path / "mm" / "model.safetensors"))
    with open(tmp_path / "mm" / "config.json", "w") as f:
        json.dump({"model_type": "gemma3", "text_config": ref.config.to_dict(), "vision_config": {}}, f)
    check(load_gemma_checkpoint(str(tmp_path / "mm")))


def test_bad_hf_checkpoints(tmp_path):
    ref = tiny_torch_gemma(seed=6)
    state = torch_state(ref)
    model = build_gemma(Gemma3Config.from_hf_dict(ref.config.to_dict()), random_init=False)
    with pytest.raises(CheckpointError, match=r"src: missing tensors \['model.layers.3.self_attn.q_norm.weight'"):
        load_hf_weights(model, {k: v for k, v in state.items() if "layers.3.self_attn.q_norm" not in k}, "src")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has shape"):
        load_hf_weights(model, {**state, "model.layers.0.mlp.up_proj.weight": np.zeros((3, 64))}, "src")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.4"):
        load_hf_weights(model, {**state, "model.layers.4.input_layernorm.weight": np.zeros(64)}, "src")
    with pytest.raises(CheckpointError, match=r"different 'lm_head.weight'"):
        load_hf_weights(model, {**state, "lm_head.weight": state["lm_head.weight"] + 1}, "src")
    ref.config.save_pretrained(tmp_path / "bert")
    edit_config(str(tmp_path / "bert"), model_type="bert")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'bert' is not a Gemma 3"):
        load_gemma_checkpoint(str(tmp_path / "bert"))


def test_hub_id_offline_names_the_id_and_the_alternatives():
    with pytest.raises(CheckpointError) as err:
        load_gemma_checkpoint("google/gemma-3-270m-not-cached")
    message = str(err.value)
    assert "'google/gemma-3-270m-not-cached'" in message
    assert "local" in message and "gguf" in message


# ---------------------------------------------------------------- GGUF files we write


def write_tiny_gguf(path, ref: transformers.Gemma3ForCausalLM, drop: str = "", arch: str = "gemma3") -> None:
    """A Gemma 3 GGUF as llama.cpp writes one: norms as 1 + w, the embedding Q8_0-quantized."""
    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern(2)  # layers 1 and 3 global, as LAYER_TYPES
    writer.add_bos_token_id(2)
    state = torch_state(ref)
    inverse = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
    inverse.update({f"model.layers.{i}.{v}": f"blk.{i}.{k}" for i in range(cfg.num_hidden_layers)
                    for k, v in GGUF_LAYER_NAMES.items()})
    for name, value in state.items():
        if name == "lm_head.weight" or inverse[name] == drop:
            continue
        if name.endswith("norm.weight"):
            value = value + 1.0
        if name == "model.embed_tokens.weight":
            writer.add_tensor(inverse[name], gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(inverse[name], np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_reads_back_in_hf_layout(tmp_path):
    ref = tiny_torch_gemma(seed=7)
    write_tiny_gguf(tmp_path / "tiny.gguf", ref)
    config, weights = read_gguf(str(tmp_path / "tiny.gguf"))
    expected = Gemma3Config.from_hf_dict(ref.config.to_dict())
    assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)  # stored as float32
    assert dataclasses.replace(config, rms_norm_eps=expected.rms_norm_eps) == expected
    state = torch_state(ref)
    state.pop("lm_head.weight")
    assert set(weights) == set(state)
    for name, value in state.items():
        if name == "model.embed_tokens.weight":  # Q8_0: within quantization error
            np.testing.assert_allclose(weights[name], value, atol=np.abs(value).max() / 100)
        else:
            np.testing.assert_allclose(weights[name], value, atol=1e-6, err_msg=name)
    ckpt = load_gemma_checkpoint(f"gguf:{tmp_path / 'tiny.gguf'}")
    assert ckpt.tokenizer_source == str(tmp_path / "tiny.gguf") and ckpt.config == config


def test_bad_gguf_files(tmp_path):
    ref = tiny_torch_gemma(seed=8)
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"notes.gguf: not a GGUF file"):
        read_gguf(str(tmp_path / "notes.gguf"))
    with pytest.raises(CheckpointError, match=r"absent.gguf: GGUF file not found"):
        load_gemma_checkpoint(str(tmp_path / "absent.gguf"))
    write_tiny_gguf(tmp_path / "missing.gguf", ref, drop="blk.2.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"missing.gguf: missing tensors \['blk.2.ffn_up.weight'\]"):
        read_gguf(str(tmp_path / "missing.gguf"))
    write_tiny_gguf(tmp_path / "llama.gguf", ref, arch="llama")
    with pytest.raises(CheckpointError, match=r"llama.gguf: GGUF architecture is 'llama', not 'gemma3'"):
        read_gguf(str(tmp_path / "llama.gguf"))
    write_tiny_gguf(tmp_path / "whole.gguf", ref)
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated.gguf: .*truncated"):
        read_gguf(str(tmp_path / "truncated.gguf"))
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"header.gguf: .*truncated"):
        read_gguf(str(tmp_path / "header.gguf"))


# ---------------------------------------------------------------- the real gemma-3-270m


PROMPTS = [
    "Passage: Berlin ist die Hauptstadt und ein Land der Bundesrepublik Deutschland. Please write a question "
    "based on this passage in German.\nQuestion: Was ist die Hauptstadt Deutschlands?",
    "Passage: 東京は日本の首都であり、世界最大の都市圏を持つ。 Please write a question based on this passage in "
    "Japanese.\nQuestion: 日本の首都はどこですか？",
    "Passage: Nairobi ni mji mkuu wa Kenya. Please write a question based on this passage in Swahili.\n"
    "Question: Mji mkuu wa Kenya ni upi?",
]


@pytest.fixture(scope="module")
def real_gguf():
    start = time.perf_counter()
    path = gemma_weights.default_gguf_path()
    assembled = time.perf_counter() - start
    start = time.perf_counter()
    config, weights = read_gguf(path)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer = gemma_weights.load_gguf_tokenizer(path)
    tokenizer_seconds = time.perf_counter() - start
    print(f"\ngemma-3-270m GGUF: path {assembled:.1f}s, read_gguf {read_seconds:.1f}s, "
          f"tokenizer (cached dir) {tokenizer_seconds:.1f}s")
    return path, config, weights, tokenizer, {"read_gguf_seconds": read_seconds,
                                               "tokenizer_load_seconds": tokenizer_seconds}


@pytest.fixture(scope="module")
def torch_gguf(real_gguf):
    path = real_gguf[0]
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    print(f"\ntransformers gguf_file= load {time.perf_counter() - start:.1f}s")
    return model


@pytest.mark.slow
def test_real_gemma_270m_matches_transformers_gguf(real_gguf, torch_gguf, record_property):
    path, config, weights, tokenizer, timings = real_gguf
    for key, value in timings.items():
        record_property(key, round(value, 2))
    # The architecture facts of Gemma-3-270M, read from the metadata.
    assert layer_indices(config, "full_attention") == [5, 11, 17]
    assert (config.rope_theta, config.rope_local_base_freq, config.sliding_window) == (1e6, 1e4, 512)
    assert config.query_pre_attn_scalar == 256 and config.head_dim == 256 and config.hidden_size == 640
    assert config.tie_word_embeddings and config.final_logit_softcapping is None
    assert (config.vocab_size, config.num_key_value_heads, config.bos_token_id) == (262_144, 1, 2)
    # Our GGUF -> HF mapping gives exactly the tensors transformers loads.
    state = torch_gguf.state_dict()
    assert set(weights) == set(state) - {"lm_head.weight"}
    for name, value in weights.items():  # both dequantize with the gguf package and subtract 1 in float32
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)

    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(e[0] == 2 for e in encoded)  # BOS is added
    length = max(map(len, encoded))
    ids = np.zeros((len(encoded), length), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1

    model = build_gemma(config, random_init=False)
    load_hf_weights(model, weights, path)

    @nnx.jit
    def target_log_probs(model, ids, mask):
        logp = jax.nn.log_softmax(model(ids, mask), axis=-1)[:, :-1]
        return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]

    ours = np.asarray(target_log_probs(model, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        logits = torch_gguf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
        logp = torch.log_softmax(logits.float(), -1)[:, :-1]
        expected = logp.gather(-1, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()
    valid = mask[:, 1:].astype(bool)
    diff = np.abs(ours[valid] - expected[valid]).max()
    record_property("max_abs_logprob_diff", float(diff))
    print(f"\nreal gemma-3-270m: max |target log-prob diff| {diff:.2e}, mean log-prob {ours[valid].mean():.3f}")
    assert diff < 1e-3
    # A language model, not noise: wrong norm offsets or permuted Q/K give a
    # mean below -7 on these prompts (measured), the right layout about -4.
    assert ours[valid].mean() > -5.0


READER_PROMPTS = [
    "Nairobi is the capital and largest city of Kenya.\n\nQuestion: What is the capital of Kenya?\nAnswer:",
    "Die Zugspitze ist mit 2962 m der höchste Berg Deutschlands.\n\nQuestion: Wie hoch ist die Zugspitze?\nAnswer:",
    "東京は日本の首都である。\n\nQuestion: 日本の首都はどこですか？\nAnswer:",
    "La Tour Eiffel a été construite en 1889.\n\nQuestion: Quand la Tour Eiffel a-t-elle été construite?\nAnswer:",
]


@pytest.mark.slow
def test_real_gemma_270m_generates_as_transformers(real_gguf, torch_gguf):
    """Greedy and beam search on the real weights, reader-style prompts of different lengths, token for token
    (umr_jax.generate against transformers' generate; the helpers are test_generate's)."""
    from test_generate import hf_generate, until_eos

    from umr_jax import generate as gen
    from umr_jax.batching import pad_rows

    path, config, weights, tokenizer, _ = real_gguf
    model = build_gemma(config, random_init=False)
    load_hf_weights(model, weights, path)
    encoded = [tokenizer(p)["input_ids"] for p in READER_PROMPTS]
    ids, mask = pad_rows(encoded, len(encoded), max(map(len, encoded)), 0)
    newline = tokenizer.convert_tokens_to_ids("\n")
    for beams in (1, 3):
        settings = gen.SearchSettings(10, eos_ids=(1, newline), pad_id=0, num_beams=beams)
        expected, expected_scores = hf_generate(torch_gguf, ids, mask, settings, decoder_only=True)
        got = nnx.jit(gen.generate, static_argnums=3)(model, jnp.asarray(ids), jnp.asarray(mask), settings)
        assert until_eos(got.tokens, settings.eos_ids) == expected, beams
        if expected_scores is not None:
            np.testing.assert_allclose(np.asarray(got.scores), expected_scores, atol=1e-3)
        if beams == 1:  # a language model reading its context: the greedy answer names the city
            assert "Nairobi" in tokenizer.decode(expected[0])


@pytest.mark.slow
def test_gguf_assembled_and_tokenizer_built_once_into_the_cache(tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("UMR_CACHE_DIR", str(tmp_path / "cache"))
    start = time.perf_counter()
    path = gemma_weights.default_gguf_path()  # joins the package chunks, checks the sha256
    assemble_seconds = time.perf_counter() - start
    assert path == str(tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf")
    assert os.listdir(tmp_path / "cache") == ["gemma-3-270m-q4_k_m.gguf"]  # no temporary left behind
    start = time.perf_counter()
    assert gemma_weights.default_gguf_path() == path
    assert time.perf_counter() - start < 1.0  # reused, not re-assembled
    start = time.perf_counter()
    built = gemma_weights.load_gguf_tokenizer(path)
    build_seconds = time.perf_counter() - start
    cached = sorted(set(os.listdir(tmp_path / "cache")) - {"gemma-3-270m-q4_k_m.gguf"})
    assert len(cached) == 1 and cached[0].startswith("gemma-3-270m-q4_k_m.") and cached[0].endswith(".tokenizer")
    start = time.perf_counter()
    again = gemma_weights.load_tokenizer(path)
    load_seconds = time.perf_counter() - start
    record_property("tokenizer_build_seconds", round(build_seconds, 2))
    print(f"\nGGUF assembly {assemble_seconds:.1f}s; tokenizer build {build_seconds:.1f}s, cached load "
          f"{load_seconds:.1f}s")
    # Ids from transformers' own gguf_file= tokenizer.
    text = "Hello world, bonjour le monde"
    assert built(text)["input_ids"] == again(text)["input_ids"] == [2, 9259, 1902, 236764, 117874, 674, 22150]
    assert again.pad_token_id == 0 and again.eos_token_id == 1 and len(again) == 262_144
