"""The device mesh and the logical-axis -> mesh-axis rules, in one place.

Models annotate parameters with logical axis names (``embed``, ``mlp``,
``heads``, ``vocab``, ...); this module turns those names into
``PartitionSpec``s through config rules, places parameters and batches on the
mesh, and is the only code that knows the mesh's shape. Nothing here depends on
the backend: one CPU device, ``--xla_force_host_platform_device_count=8``, a
GPU box or a TPU pod slice all go through :func:`make_mesh`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Data parallelism over `data`, tensor parallelism over `model`. The vocab
# dimension is split over `model` too: the 250k-row embedding tables are the
# largest single tensors of both retriever and teacher.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("kv_heads", "model"),  # grouped-query attention; one kv head (Gemma 3 270M) is replicated
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 and checks that the shape uses exactly all devices."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one dimension may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: dimensions must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {shape} cannot use {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available"
        )
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = ("data", "model"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh; `jax.make_mesh` picks a topology-aware device order on TPU."""
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} and axis names {tuple(axis_names)} differ in length")
    for required in ("data", "model"):
        if required not in axis_names:
            raise ValueError(f"mesh axis names {tuple(axis_names)} must include {required!r}")
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    # Auto axes: the compiler (GSPMD/Shardy) propagates shardings from the
    # annotated inputs, as in T5X/MaxText, instead of sharding-in-types.
    axis_types = (AxisType.Auto,) * len(resolved)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(resolved, tuple(axis_names), axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(resolved), tuple(axis_names), axis_types=axis_types)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A dimension that the mapped mesh axis does not divide (e.g. a 250,037-row
    vocabulary on 2 model shards) is replicated rather than failing: GSPMD
    requires even shards, and replicating one table costs only memory. A mesh
    axis is used at most once per tensor.
    """
    rule_map = dict(rules)
    used: set[str] = set()
    spec: list[str | None] = []
    for name, dim in zip(logical_axes, shape, strict=True):
        if name is not None and name not in rule_map:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(rule_map)}")
        mesh_axis = rule_map.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        if dim % mesh.shape[mesh_axis]:
            logging.log_first_n(
                logging.INFO, "replicating logical axis %r (size %d) not divisible by mesh axis %r (%d)",
                8, name, dim, mesh_axis, mesh.shape[mesh_axis])
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def _variable_spec(var: nnx.Variable, mesh: Mesh, rules) -> PartitionSpec:
    axes = var.get_metadata().get("out_sharding")
    value = var.get_value()
    if not axes:
        return PartitionSpec()
    return logical_to_spec(axes, value.shape, mesh, rules)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Where one parameter lives on the mesh (from its logical axes)."""
    return NamedSharding(mesh, _variable_spec(var, mesh, rules))


def placement(mesh: Mesh, rules=DEFAULT_RULES) -> Callable[[nnx.Variable], NamedSharding]:
    """`variable_sharding` on this mesh: how checkpoint loaders place each tensor straight into its shards."""
    return lambda var: variable_sharding(var, mesh, rules)


def state_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding tree matching an `nnx.State` (or any tree of Variables)."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Places a module's state on the mesh in place; returns the shardings tree."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return shardings


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension over the data axis, the rest replicated."""
    data_axis = dict(rules).get("batch", "data")
    return NamedSharding(mesh, PartitionSpec(data_axis, *([None] * (ndim - 1))))


def stacked_batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """(micro-batch, batch, ...) arrays: the second dimension over the data axis."""
    return NamedSharding(mesh, PartitionSpec(None, dict(rules).get("batch", "data")))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways a batch is split: batch sizes must be multiples of this."""
    data_axis = dict(rules).get("batch", "data")
    return int(mesh.shape[data_axis]) if data_axis else 1


def shard_batch(arrays: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Puts host numpy arrays on the mesh, split along their leading dimension."""
    size = data_parallel_size(mesh, rules)
    for leaf in jax.tree.leaves(arrays):
        if leaf.shape[0] % size:
            raise ValueError(f"batch dimension {leaf.shape[0]} is not divisible by the data axis size {size}")
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim, rules)), arrays)
