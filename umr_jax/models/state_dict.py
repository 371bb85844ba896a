"""Hugging Face state dicts <-> our Flax parameters: the copy-and-check loop every model family shares.

Each family's weights module (:mod:`~umr_jax.models.bert_weights`,
:mod:`~umr_jax.models.t5_weights`, :mod:`~umr_jax.models.gemma_weights`) lists
its tensors as :data:`Slot` tuples and knows how each layout converts; this
module walks those slots. Shapes are checked tensor by tensor so that a config
that disagrees with its weights fails naming the tensor, never with a
broadcasting error deep inside jit; the caller supplies the config fields and
hints that make each error actionable for its model family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# (hf_name, our_param, hf_shape, layout): layout names how the PyTorch tensor
# becomes ours ('same', 'T', or a family-specific head reshaping).
Slot = tuple[str, nnx.Param, tuple[int, ...], str]
# Where a parameter lives on the mesh (sharding.variable_sharding bound to a mesh).
Placement = Callable[[nnx.Param], jax.sharding.Sharding]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match its config."""


def name_list(names: list[str]) -> str:
    """The first five names, and how many more there are."""
    return f"{names[:5]}" + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def to_ours(x: np.ndarray, layout: str, head_dim: int) -> np.ndarray:
    """A PyTorch-layout tensor in our layout.

    'same'; 'T' (a Linear weight, transposed); 'heads_in' ((heads*head_dim,
    in) -> (in, heads, head_dim): q/k/v projections); 'heads_bias' ((heads*
    head_dim,) -> (heads, head_dim)); 'heads_out' ((out, heads*head_dim) ->
    (heads, head_dim, out): attention output projections).
    """
    if layout == "T":
        return x.T
    if layout == "heads_in":
        return x.T.reshape(x.shape[1], x.shape[0] // head_dim, head_dim)
    if layout == "heads_bias":
        return x.reshape(-1, head_dim)
    if layout == "heads_out":
        return x.T.reshape(x.shape[1] // head_dim, head_dim, x.shape[0])
    return x


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of :func:`to_ours`."""
    if layout == "T":
        return x.T
    if layout == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if layout == "heads_bias":
        return x.reshape(-1)
    if layout == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    return x


def load_state_dict(slots: Iterable[Slot], weights: Mapping[str, np.ndarray], source: str,
                    to_ours: Callable[[np.ndarray, str], np.ndarray], *, config_fields: str,
                    missing_hint: str, unexpected_hint: str,
                    placement: Placement | None = None) -> None:
    """Copies HF-named tensors into the slots' parameters: every tensor present and fitting, none left over.

    With `placement` (a parameter's sharding on the mesh), each tensor goes
    straight to its shards: a device receives only its slice, so a model larger
    than one chip loads on a `model`-sharded mesh (the host converts one tensor
    at a time). Without, a tensor lands whole on the default device.

    `weights` holds canonical names only (each family folds prefixes, aliases
    and tensors it ignores first). Errors start with `source`; a wrong shape
    names `config_fields` (the config values that decide the shapes), a
    missing or unexpected tensor ends with `missing_hint` / `unexpected_hint`.
    """
    used: set[str] = set()
    missing: list[str] = []
    for name, param, shape, layout in slots:
        if name not in weights:
            missing.append(name)
            continue
        value = np.asarray(weights[name])
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(value.shape)} but the config "
                                  f"({config_fields}) expects {shape}")
        dtype = param.get_value().dtype
        if placement is None:
            param.set_value(jnp.asarray(to_ours(value, layout), dtype=dtype))
        else:
            host = np.asarray(to_ours(value, layout)).astype(dtype, copy=False)
            param.set_value(jax.make_array_from_callback(host.shape, placement(param),
                                                         lambda index, host=host: host[index]))
        used.add(name)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {name_list(missing)}; {missing_hint}")
    unexpected = [k for k in weights if k not in used]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {name_list(unexpected)}; {unexpected_hint}")


def export_state_dict(slots: Iterable[Slot], to_hf: Callable[[np.ndarray, str], np.ndarray]) -> dict[str, np.ndarray]:
    """The slots' parameters as a float32, C-contiguous state dict in PyTorch layout."""
    out = {}
    for name, param, _, layout in slots:
        value = np.asarray(param.get_value(), dtype=np.float32)
        out[name] = np.ascontiguousarray(to_hf(value, layout))
    return out
