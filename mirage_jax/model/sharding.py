"""Where every parameter lives on a device mesh: one table, one set of rules, JAX's SPMD does the rest.

Why it is built this way (the MaxText / T5X habit):

* Two steps, kept apart. Each parameter leaf has *logical* axes that say what its dimensions mean
  (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`); *rules* map logical axes to *mesh* axes (`data`,
  `fsdp`, `tensor`). The table is a property of the architecture, the rules a property of the
  hardware, so changing one never touches the other.
* Nothing home-made runs the computation. Parameters are placed with `NamedSharding`s and the
  jitted forward, generation and edits are the same functions as on one device: XLA's SPMD
  partitioner propagates the layout through them and inserts the collectives. The mesh uses Auto
  axis types (jax >= 0.6) so that propagation decides every intermediate.
* A dimension a mesh axis cannot divide (SmolLM2 has 9 heads and 3 KV heads; 8 devices divide
  neither) is replicated along that axis instead, and logged once with the leaf and the axis:
  a model that fits replicated must not fail because one small projection cannot be split.
* Leaves the table does not know (an adapter added by an edit) are replicated: they are small, and
  an edit must never fail to place its result.

Mesh strings are `axis:size` pairs, e.g. `data:2,tensor:4`; `-1` takes the remaining devices and
the empty string means `fsdp` over every device (parameters split once, batches split the same
way: what lets the largest model fit).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
LogicalAxes = tuple[str | None, ...]


class MeshError(ValueError):
    """A mesh string or layout that cannot be built (one line: the axis and the reason)."""


# --- the table: parameter leaf -> logical axes ---------------------------------------------------
# Paths are "/"-joined pytree keys with the layer index replaced by "*". Attention kernels keep the
# flat [D, heads * head_dim] layout of the checkpoint; splitting the flat axis on `tensor` splits
# whole heads when the head count divides the axis (checked against `heads`, see `_divides`).
_TABLE: dict[str, LogicalAxes] = {
    "embed/embedding": ("vocab", "embed"),
    "pos_embed/embedding": (None, "embed"),
    "layers/*/attn/q/kernel": ("embed", "heads"),
    "layers/*/attn/k/kernel": ("embed", "kv_heads"),
    "layers/*/attn/v/kernel": ("embed", "kv_heads"),
    "layers/*/attn/o/kernel": ("heads", "embed"),
    "layers/*/attn/q/bias": ("heads",),
    "layers/*/attn/k/bias": ("kv_heads",),
    "layers/*/attn/v/bias": ("kv_heads",),
    "layers/*/attn/o/bias": (None,),
    "layers/*/mlp/gate/kernel": ("embed", "mlp"),
    "layers/*/mlp/up/kernel": ("embed", "mlp"),
    "layers/*/mlp/down/kernel": ("mlp", "embed"),
    "layers/*/mlp/gate/bias": ("mlp",),
    "layers/*/mlp/up/bias": ("mlp",),
    "layers/*/mlp/down/bias": (None,),
    "lm_head/kernel": ("embed", "vocab"),
    "lm_head/bias": ("vocab",),
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axis (or axes, or None = replicated). The defaults: weights split on
    `fsdp` along the model width and on `tensor` along heads / MLP width / vocabulary, activations'
    batch on `data` and `fsdp` together (FSDP: each device holds a slice of the weights and of the
    batch, and gathers a layer's weights when it needs them)."""

    embed: str | None = "fsdp"
    heads: str | None = "tensor"
    kv_heads: str | None = "tensor"
    mlp: str | None = "tensor"
    vocab: str | None = "tensor"
    batch: tuple[str, ...] = ("data", "fsdp")

    def mesh_axis(self, logical: str | None) -> str | tuple[str, ...] | None:
        return None if logical is None else getattr(self, logical)


DEFAULT_RULES = Rules()


def leaf_name(path: Sequence[Any]) -> str:
    """'layers/*/mlp/down/kernel' for a `tree_flatten_with_path` path (layer index -> '*')."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append("*" if isinstance(key, int) else str(key))
    return "/".join(parts)


def logical_axes(path: Sequence[Any], ndim: int) -> LogicalAxes:
    """The table's logical axes of a leaf; unknown leaves (adapters, counters) are replicated."""
    axes = _TABLE.get(leaf_name(path))
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


# --- meshes ------------------------------------------------------------------------------------


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """'data:2,tensor:4' -> {'data': 2, 'fsdp': 1, 'tensor': 4}; '' -> fsdp over every device.

    One `-1` takes what the others leave. The sizes must multiply to `n_devices`.
    """
    spec = spec.strip()
    if not spec:
        return {"data": 1, "fsdp": n_devices, "tensor": 1}
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(-?\d+)\s*", item)
        if not m:
            raise MeshError(f"--mesh: {item.strip()!r} is not axis:size (e.g. data:2,tensor:4)")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise MeshError(f"--mesh: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise MeshError(f"--mesh: axis {name!r} given twice")
        if size == 0 or size < -1:
            raise MeshError(f"--mesh: axis {name!r} has size {size}; sizes are positive (or -1 for the rest)")
        sizes[name] = size
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError("--mesh: only one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % known:
            raise MeshError(f"--mesh: {known} devices in the fixed axes do not divide the {n_devices} devices")
        sizes[free[0]] = n_devices // known
    full = {a: sizes.get(a, 1) for a in MESH_AXES}
    if math.prod(full.values()) != n_devices:
        raise MeshError(f"--mesh {spec!r} has {math.prod(full.values())} devices; this run has {n_devices}")
    return full


def make_mesh(spec: str = "", devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# --- shardings -----------------------------------------------------------------------------------


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in names)


def _head_count(logical: str | None, cfg: Any) -> int | None:
    """Heads are split whole: the divisor that matters is the head count, not the flat width."""
    if cfg is None:
        return None
    return {"heads": getattr(cfg, "num_heads", None), "kv_heads": getattr(cfg, "num_kv_heads", None)}.get(
        logical or "")


def spec_for(name: str, shape: Sequence[int], axes: LogicalAxes, mesh: Mesh, rules: Rules = DEFAULT_RULES,
             cfg: Any = None, warned: set | None = None) -> PartitionSpec:
    """The PartitionSpec of one leaf; a dimension its mesh axis cannot divide is replicated (logged)."""
    out: list[Any] = []
    used: set[str] = set()
    for dim, logical in zip(shape, axes):
        axis = rules.mesh_axis(logical)
        size = _axis_size(mesh, axis)
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        heads = _head_count(logical, cfg)
        count = heads if heads is not None else dim
        if size == 1 or used.intersection(names):
            out.append(None)
            continue
        if count % size or dim % size:
            key = (name, logical, axis)
            if warned is None or key not in warned:
                log.info("sharding: %s dim %s=%d (%s) is not divisible by mesh axis %s=%d; replicated along it",
                         name, logical, dim, f"{heads} heads" if heads is not None else "size", axis, size)
                if warned is not None:
                    warned.add(key)
            out.append(None)
            continue
        out.append(axis)
        used.update(names)
    return PartitionSpec(*out)


def placement(mesh: Mesh, cfg: Any = None, rules: Rules = DEFAULT_RULES) -> Callable[[Sequence[Any], Sequence[int]],
                                                                                  NamedSharding]:
    """(leaf path, shape) -> NamedSharding: what a loader needs before the pytree exists.
    Paths may be pytree key paths or plain tuples like ("layers", 3, "mlp", "down", "kernel")."""
    warned: set = set()

    def place(path: Sequence[Any], shape: Sequence[int]) -> NamedSharding:
        shape = tuple(shape)
        axes = logical_axes(path, len(shape))
        return NamedSharding(mesh, spec_for(leaf_name(path), shape, axes, mesh, rules, cfg, warned))

    return place


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, cfg: Any = None) -> Any:
    """A pytree of `NamedSharding`s matching `params` (arrays or `jax.ShapeDtypeStruct`s)."""
    place = placement(mesh, cfg, rules)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: place(path, np.shape(leaf)), params)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, cfg: Any = None) -> Any:
    """`params` placed on `mesh` (a copy; each device receives only its slices)."""
    return jax.device_put(params, param_shardings(params, mesh, rules, cfg))


def batch_sharding(mesh: Mesh, ndim: int, batch: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Rows of a `[B, ...]` array split over the batch axes (replicated when they do not divide B)."""
    axis: Any = tuple(a for a in rules.batch if mesh.shape[a] > 1)
    if not axis or batch % _axis_size(mesh, axis):
        axis = None
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def batch_axis_size(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: the smallest batch bucket that keeps every device busy."""
    return 1 if mesh is None else _axis_size(mesh, rules.batch)


def cache_sharding(mesh: Mesh, cfg: Any, batch: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """A KV cache layer, keys `[B, H_kv, hd, S]` and values `[B, H_kv, S, hd]` alike: rows on the
    batch axes, KV heads on theirs (each device attends its own heads of its own rows, the layout
    the projections produce)."""
    rows = batch_sharding(mesh, 1, batch, rules).spec[0]
    heads = spec_for("kv_cache", (cfg.num_kv_heads,), ("kv_heads",), mesh, rules, cfg, warned=set())[0]
    return NamedSharding(mesh, PartitionSpec(rows, heads, None, None))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the leaves of `tree` are placed on, if they carry a `NamedSharding` over several devices."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def bytes_per_device(shapes: Any, shardings: Any) -> int:
    """Bytes the largest device holds for `shapes` (ShapeDtypeStructs) placed with `shardings`."""
    per: dict[Any, int] = {}
    for s, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        shard = sh.shard_shape(s.shape)
        nbytes = math.prod(shard) * np.dtype(s.dtype).itemsize
        for d in sh.device_set:
            per[d] = per.get(d, 0) + nbytes
    return max(per.values()) if per else 0


def describe(mesh: Mesh) -> str:
    """'data:1,fsdp:8,tensor:1 on 8 cpu devices' for logs."""
    shape = ",".join(f"{a}:{mesh.shape[a]}" for a in mesh.axis_names)
    kinds = {d.platform for d in mesh.devices.flat}
    return f"{shape} on {mesh.size} {'/'.join(sorted(kinds))} devices"


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshError",
    "Rules",
    "batch_axis_size",
    "batch_sharding",
    "bytes_per_device",
    "cache_sharding",
    "describe",
    "leaf_name",
    "logical_axes",
    "make_mesh",
    "mesh_of",
    "param_shardings",
    "parse_mesh",
    "placement",
    "shard_params",
    "spec_for",
]


def _check_table(table: Mapping[str, LogicalAxes] = _TABLE) -> None:
    """Every logical axis in the table has a rule (import-time guard against typos)."""
    known = {f.name for f in dataclasses.fields(Rules)}
    for name, axes in table.items():
        for a in axes:
            if a is not None and a not in known:
                raise AssertionError(f"sharding table: {name} uses unknown logical axis {a!r}")


_check_table()
