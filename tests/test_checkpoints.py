"""Import from Hugging Face directories / hub ids, export back, and bad checkpoints."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import TINY, edit_config, ours_from_torch, padded_batch, tiny_torch_bert, torch_pooled
from umr_jax.models.bert_checkpoint import export_hf, load_checkpoint
from umr_jax.models.bert_weights import CheckpointError
from umr_jax.retriever import build_encoder, default_config


@pytest.fixture
def hf_dir(tmp_path):
    ref = tiny_torch_bert()
    ref.save_pretrained(tmp_path / "tiny")  # config.json + model.safetensors
    return ref, str(tmp_path / "tiny")


def _encoder_from(ckpt):
    from umr_jax.models.bert_weights import load_hf_weights
    cfg = default_config()
    cfg.normalize = False
    enc = build_encoder(ckpt.config, cfg, seed=0, random_init=False)
    load_hf_weights(enc, ckpt.weights, ckpt.description)
    return enc


def test_import_safetensors_directory(hf_dir):
    ref, path = hf_dir
    enc = _encoder_from(load_checkpoint(path))
    ids, mask = padded_batch()
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask))),
                               torch_pooled(ref, ids, mask), atol=1e-4, rtol=0)


def test_import_pytorch_bin_with_bert_prefix(tmp_path):
    # A BertFor* checkpoint: 'bert.' prefix, a pooler and a head that we ignore.
    ref = tiny_torch_bert(seed=1)
    state = {f"bert.{k}": v for k, v in ref.state_dict().items()}
    state["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
    os.makedirs(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    ref.config.save_pretrained(tmp_path / "bin")
    enc = _encoder_from(load_checkpoint(str(tmp_path / "bin")))
    ids, mask = padded_batch(seed=2)
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask))),
                               torch_pooled(ref, ids, mask), atol=1e-4, rtol=0)


def test_export_round_trip_through_automodel(hf_dir, tmp_path):
    ref, _ = hf_dir
    ours = ours_from_torch(ref)
    tokenizer = transformers.BertTokenizerFast(vocab_file=_write_vocab(tmp_path))
    out = export_hf(ours, tokenizer, str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json", "umr_jax.json"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temporary dir renamed away
    back = transformers.AutoModel.from_pretrained(out).eval()
    assert type(back).__name__ == "BertModel"
    ids, mask = padded_batch(seed=4)
    np.testing.assert_allclose(torch_pooled(back, ids, mask),
                               np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"][0] == tokenizer.cls_token_id
    # And back into ours: export -> import is the identity on the parameters.
    again = _encoder_from(load_checkpoint(out))
    np.testing.assert_array_equal(np.asarray(again.layers[1].attention.query_kernel.get_value()),
                                  np.asarray(ours.layers[1].attention.query_kernel.get_value()))



def test_export_loads_without_a_load_report_and_in_sentence_transformers(hf_dir, tmp_path, capfd):
    # Our towers have no pooler; a plain AutoModel.from_pretrained must still find every tensor it builds
    # (a MISSING pooler reads as a broken checkpoint), and sentence-transformers must give our embeddings.
    from sentence_transformers import SentenceTransformer

    from umr_jax.models.bert_checkpoint import write_sentence_transformers_files

    ref, _ = hf_dir
    ours = ours_from_torch(ref, normalize=True)
    tokenizer = transformers.BertTokenizerFast(vocab_file=_write_vocab(tmp_path))
    out = export_hf(ours, tokenizer, str(tmp_path / "export"), write_extra=lambda d: write_sentence_transformers_files(
        d, ours, {"query": "", "passage": ""}, "passage", 24))
    back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not info["mismatched_keys"] and not info["error_msgs"]
    texts = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9", "w10"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert not back.eval()(**batch).pooler_output.any()  # the documented zero pooler, nothing that looks trained
    expected = np.asarray(ours(jnp.asarray(batch["input_ids"].numpy()), jnp.asarray(batch["attention_mask"].numpy())))
    st = SentenceTransformer(out, device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, expected, atol=1e-5, rtol=0)
    assert "LOAD REPORT" not in capfd.readouterr().err  # neither load printed transformers' report


def _write_vocab(tmp_path) -> str:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TINY["vocab_size"] - 5)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return str(path)


def test_missing_weights_file(hf_dir):
    _, path = hf_dir
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no weights found \(expected model.safetensors"):
        load_checkpoint(path)


def test_missing_config(hf_dir):
    _, path = hf_dir
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(path)


def test_unknown_architecture(hf_dir):
    _, path = hf_dir
    edit_config(path, model_type="gpt2")
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not a supported retriever architecture"):
        load_checkpoint(path)


def test_config_that_does_not_match_weights(hf_dir):
    _, path = hf_dir
    edit_config(path, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"intermediate.dense.weight' has shape \(64, 32\).*expects \(48, 32\)"):
        _encoder_from(load_checkpoint(path))


def test_fewer_layers_in_weights_than_config(hf_dir):
    _, path = hf_dir
    edit_config(path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder.layer.2"):
        _encoder_from(load_checkpoint(path))


def test_truncated_safetensors(hf_dir):
    _, path = hf_dir
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        load_checkpoint(path)


def test_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"could not fetch 'facebook/mcontriever'.*local directory"):
        load_checkpoint("facebook/mcontriever")


def test_neither_directory_nor_hub_id():
    with pytest.raises(CheckpointError, match="no such directory, and not a hub id"):
        load_checkpoint("/does/not/exist")
