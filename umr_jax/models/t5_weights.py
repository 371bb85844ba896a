"""Hugging Face ``MT5ForConditionalGeneration`` / ``T5ForConditionalGeneration`` <-> our Flax MT5.

Checkpoint sources, by what the user passes as the teacher checkpoint:
  * a local directory with ``config.json`` (model_type 'mt5' or 't5') and
    ``model.safetensors`` (also sharded) or ``pytorch_model.bin`` (also
    sharded);
  * a hub id such as ``google/mt5-xl``, fetched with huggingface_hub.

Every import produces a flat ``{hf_name: numpy array}`` dict in PyTorch layout
first; :func:`load_hf_weights` is the one place that knows how those tensors map
onto :mod:`umr_jax.models.t5`, and :func:`export_hf_weights` the inverse. Shapes
are checked tensor by tensor so that a config that disagrees with its weights
fails naming the tensor, never with a broadcasting error inside jit.

Names in a T5 state dict (``{s}`` = encoder or decoder, ``{i}`` = block):
  shared.weight                                  (vocab, d_model) input embedding of both stacks
  {s}.embed_tokens.weight                        aliases of shared.weight (older checkpoints carry them)
  {s}.block.{i}.layer.0.SelfAttention.{q,k,v}    (heads * d_kv, d_model)
  {s}.block.{i}.layer.0.SelfAttention.o          (d_model, heads * d_kv)
  {s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (buckets, heads), block 0 only
  decoder.block.{i}.layer.1.EncDecAttention.*    cross-attention (decoder only, shifts FFN to layer.2)
  {s}.block.{i}.layer.{j}.layer_norm.weight      pre-norm of sub-layer j
  ...DenseReluDense.{wi_0,wi_1,wo} (gated) or {wi,wo}
  {s}.final_layer_norm.weight, lm_head.weight    (vocab, d_model) untied head
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from umr_jax import atomic
from umr_jax.models.hf_checkpoint import HUB_ID, download_from_hub, read_config_json, read_hf_weights
from umr_jax.models.state_dict import (
    CheckpointError,
    Placement,
    Slot,
    export_state_dict,
    load_state_dict,
    to_hf,
    to_ours,
)
from umr_jax.models.t5 import MODEL_TYPES, MT5, T5Config

_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints carry a cross-attention bias table that T5 never uses
# (transformers ignores it too).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_CHECKPOINT_FLAG = "--config.teacher.checkpoint"


@dataclasses.dataclass
class LoadedT5:
    """A T5/mT5 checkpoint in Hugging Face naming, ready for :func:`load_hf_weights`."""

    config: T5Config
    weights: dict[str, np.ndarray]
    tokenizer_source: str  # a directory for AutoTokenizer
    description: str


def _attention_slots(prefix: str, att: Any, cfg: T5Config) -> Iterator[Slot]:
    inner, e = cfg.inner_dim, cfg.d_model
    for name in ("q", "k", "v"):
        yield f"{prefix}.{name}.weight", getattr(att, f"{name}_kernel"), (inner, e), "heads_in"
    yield f"{prefix}.o.weight", att.o_kernel, (e, inner), "heads_out"
    if att.relative_bias is not None:
        yield (f"{prefix}.relative_attention_bias.weight", att.relative_bias,
               (cfg.relative_attention_num_buckets, cfg.num_heads), "same")


def _ffn_slots(prefix: str, ffn: Any, cfg: T5Config) -> Iterator[Slot]:
    e, m = cfg.d_model, cfg.d_ff
    names = ("wi_0", "wi_1") if ffn.gated else ("wi",)
    for name in names:
        yield f"{prefix}.DenseReluDense.{name}.weight", getattr(ffn, name), (m, e), "T"
    yield f"{prefix}.DenseReluDense.wo.weight", ffn.wo, (e, m), "T"


def _slots(model: MT5) -> Iterator[Slot]:
    """(hf_name, our_param, hf_shape, layout) for every tensor of the model.

    layout says how the PyTorch tensor becomes ours (see
    :func:`umr_jax.models.state_dict.to_ours`).
    """
    cfg = model.config
    e = cfg.d_model
    yield "shared.weight", model.shared, (cfg.vocab_size, e), "same"
    for i, layer in enumerate(model.encoder.layers):
        p = f"encoder.block.{i}.layer"
        yield from _attention_slots(f"{p}.0.SelfAttention", layer.attention, cfg)
        yield f"{p}.0.layer_norm.weight", layer.attention_norm.scale, (e,), "same"
        yield from _ffn_slots(f"{p}.1", layer.ffn, cfg)
        yield f"{p}.1.layer_norm.weight", layer.ffn_norm.scale, (e,), "same"
    yield "encoder.final_layer_norm.weight", model.encoder.final_norm.scale, (e,), "same"
    for i, layer in enumerate(model.decoder.layers):
        p = f"decoder.block.{i}.layer"
        yield from _attention_slots(f"{p}.0.SelfAttention", layer.self_attention, cfg)
        yield f"{p}.0.layer_norm.weight", layer.self_attention_norm.scale, (e,), "same"
        yield from _attention_slots(f"{p}.1.EncDecAttention", layer.cross_attention, cfg)
        yield f"{p}.1.layer_norm.weight", layer.cross_attention_norm.scale, (e,), "same"
        yield from _ffn_slots(f"{p}.2", layer.ffn, cfg)
        yield f"{p}.2.layer_norm.weight", layer.ffn_norm.scale, (e,), "same"
    yield "decoder.final_layer_norm.weight", model.decoder.final_norm.scale, (e,), "same"
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head, (cfg.vocab_size, e), "T"


def _resolve_embeddings(model: MT5, weights: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Folds the embedding aliases and the head's tying into one canonical set of names (minus _IGNORED).

    transformers ties encoder/decoder.embed_tokens (and, in version 5, lm_head
    whenever the checkpoint lacks it) to shared.weight, so a checkpoint may
    hold any subset of those names. Copies that differ would be separate
    tensors in transformers, which our model cannot represent: an error, not a
    silent pick.
    """
    out = {k: v for k, v in weights.items() if k not in _IGNORED}
    aliases = [name for name in _ALIASES if name in out]
    if "shared.weight" not in out and aliases:
        out["shared.weight"] = out[aliases[0]]
    shared = out.get("shared.weight")
    for name in aliases:
        value = out.pop(name)
        if shared is not None and value.shape == shared.shape and not np.array_equal(value, shared):
            raise CheckpointError(f"{source}: {name!r} differs from 'shared.weight'; T5 uses one input "
                                  "embedding for both stacks")
    if model.lm_head is None:
        head = out.pop("lm_head.weight", None)
        if head is not None and shared is not None and not np.array_equal(head, shared):
            raise CheckpointError(
                f"{source}: the config ties the LM head to 'shared.weight' (model_type 't5' with "
                "scale_decoder_outputs / tie_word_embeddings true) but the checkpoint has a different "
                "'lm_head.weight'; set tie_word_embeddings (and scale_decoder_outputs) to false in config.json "
                "if the head is separate")
    elif "lm_head.weight" not in out and shared is not None:
        # What transformers 5 does for an mT5 saved with a tied head: the
        # head is shared.weight, unscaled.
        logging.info("%s: no lm_head.weight; using shared.weight as the LM head (as transformers does)", source)
        out["lm_head.weight"] = shared
    return out


def load_hf_weights(model: MT5, weights: Mapping[str, np.ndarray], source: str,
                    placement: Placement | None = None) -> None:
    """Copies HF-named tensors into `model`; every tensor must be present and fit (placed on the mesh
    shard by shard with `placement`, see load_state_dict)."""
    cfg = model.config
    load_state_dict(
        _slots(model), _resolve_embeddings(model, weights, source), source,
        lambda x, layout: to_ours(x, layout, cfg.d_kv),
        config_fields=(f"d_model {cfg.d_model}, d_kv {cfg.d_kv}, num_heads {cfg.num_heads}, d_ff {cfg.d_ff}, "
                       f"vocab {cfg.vocab_size}, buckets {cfg.relative_attention_num_buckets}"),
        missing_hint=(f"is this a T5/mT5 checkpoint matching its config (feed_forward_proj "
                      f"{cfg.feed_forward_proj!r}, num_layers {cfg.num_layers}, num_decoder_layers "
                      f"{cfg.num_decoder_layers})?"),
        unexpected_hint=(f"the config has num_layers {cfg.num_layers}, num_decoder_layers "
                         f"{cfg.num_decoder_layers}, feed_forward_proj {cfg.feed_forward_proj!r}"),
        placement=placement)


def export_hf_weights(model: MT5) -> dict[str, np.ndarray]:
    """Our parameters as a float32 PyTorch-layout state dict that transformers loads without warnings.

    ``encoder/decoder.embed_tokens.weight`` are left out (transformers ties
    them to ``shared.weight``); ``lm_head.weight`` is always written, a copy of
    ``shared.weight`` for the tied variant, so tools that read the file
    without transformers' tying still find the head.
    """
    out = export_state_dict(_slots(model), to_hf)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["shared.weight"].copy()
    return out


def read_t5_config(directory: str) -> T5Config:
    """config.json of a T5/mT5 directory; any other model_type is a clear error naming the file."""
    path, raw = read_config_json(directory, MODEL_TYPES, "an encoder-decoder teacher architecture")
    try:
        return T5Config.from_hf_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_t5_checkpoint(spec: str, tokenizer: str = "") -> LoadedT5:
    """Resolves a local directory or a hub id to config, weights and tokenizer source."""
    if os.path.isdir(spec):
        directory = spec
    elif os.path.exists(spec):
        raise CheckpointError(f"{spec}: is a file; pass a Hugging Face T5/mT5 model directory or a hub id")
    elif HUB_ID.match(spec):
        directory = download_from_hub(spec, flag=_CHECKPOINT_FLAG)
    else:
        raise CheckpointError(f"{spec!r}: no such directory, and not a hub id of the form 'org/name'")
    config = read_t5_config(directory)
    return LoadedT5(config, read_hf_weights(directory), tokenizer or directory, directory)


def build_mt5(config: T5Config, *, param_dtype: str | jnp.dtype = "float32", dtype: str | jnp.dtype = "float32",
              seed: int = 0, random_init: bool = True) -> MT5:
    """A model for `config`; random_init=False skips the random draws when weights are loaded next."""
    return MT5(config, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(params=seed, dropout=seed + 1),
               random_init=random_init)


def export_t5_hf(model: MT5, tokenizer: Any, out_dir: str) -> str:
    """Writes config.json, model.safetensors and the tokenizer's files, atomically.

    The directory loads with transformers' ``MT5ForConditionalGeneration``
    (``T5ForConditionalGeneration`` for the tied variant) and ``AutoTokenizer``;
    `tokenizer` may be None to write the model alone.
    """
    from safetensors.numpy import save_file

    def write(tmp: str) -> None:
        hf_config = model.config.to_hf_dict()
        hf_config["torch_dtype"] = "float32"
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        save_file(export_hf_weights(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)

    return atomic.replace_dir(out_dir, write)
