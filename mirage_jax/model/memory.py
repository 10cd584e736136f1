"""Per-device memory of a model on a mesh, computed from shapes alone (no weights, no devices).

Why: whether Llama-2-70B fits a v5e-16 slice, or a 7B model one v5e chip's share, must be known
before renting the slice. Parameter shapes follow from the config (`param_shapes`, checked against
loaded checkpoints in tests), their layout from the same rules the loader uses
(`sharding.spec_for`), on an `AbstractMesh` of any size. What is counted:

* params: every leaf's shard in the model dtype;
* kv_cache: generation's cache, `batch` rows x `seq` slots, rows on the batch axes, KV heads on
  `tensor` (as `sharding.cache_sharding` places it);
* edit: the largest working set of one edit: ROME/MEMIT's F x F float32 second moment and its
  factor (one layer; held whole on a device by the solver), or FT's float32 copy of one layer's
  MLP kernels with Adam's two moments (sharded like the kernels).

    python -m mirage_jax.model.memory    # the BUILD_NOTES table
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from mirage_jax.model import sharding
from mirage_jax.model.config import ModelConfig

GiB = 1024**3


def param_shapes(cfg: ModelConfig, dtype: Any = jnp.bfloat16) -> dict:
    """The parameter pytree of `cfg` as `jax.ShapeDtypeStruct`s (what `load_model` would build)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731

    def norm() -> dict:
        return {"scale": s(d), "bias": s(d)} if cfg.norm == "layer" else {"scale": s(d)}

    def dense(n_in: int, n_out: int, bias: bool) -> dict:
        return {"kernel": s(n_in, n_out), "bias": s(n_out)} if bias else {"kernel": s(n_in, n_out)}

    def layer() -> dict:
        attn = {n: dense(d, w, cfg.attn_bias) for n, w in (("q", hq), ("k", hkv), ("v", hkv))}
        attn["o"] = dense(hq, d, cfg.attn_out_bias)
        mlp = {"up": dense(d, f, cfg.mlp_bias), "down": dense(f, d, cfg.mlp_bias)}
        if cfg.gated_mlp:
            mlp["gate"] = dense(d, f, cfg.mlp_bias)
        out = {"attn_norm": norm(), "attn": attn, "mlp": mlp}
        if not cfg.parallel_residual:
            out["mlp_norm"] = norm()
        return out

    tree: dict = {"embed": {"embedding": s(v, d)}, "layers": [layer() for _ in range(cfg.num_layers)],
                  "final_norm": norm()}
    if cfg.learned_positions:
        tree["pos_embed"] = {"embedding": s(cfg.max_position_embeddings, d)}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = dense(d, v, cfg.lm_head_bias)
    return tree


def abstract_mesh(spec: str, n_devices: int) -> AbstractMesh:
    sizes = sharding.parse_mesh(spec, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _shard_bytes(shape: Sequence[int], dtype: Any, spec: Any, mesh: Any) -> int:
    """Bytes of one device's shard (the largest: a split dimension rounds up)."""
    per = 1
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        per *= math.ceil(dim / math.prod(mesh.shape[a] for a in names))
    return per * np.dtype(dtype).itemsize


def kv_cache_bytes(cfg: ModelConfig, rows: int, seq: int, dtype: Any, kv_heads: int | None = None) -> int:
    """Bytes of generation's KV cache (keys and values of every layer) for `rows` x `seq` slots;
    `kv_heads`: the KV heads held (a device's share on a mesh), by default all of them."""
    heads = cfg.num_kv_heads if kv_heads is None else kv_heads
    return 2 * cfg.num_layers * rows * seq * heads * cfg.head_dim * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Footprint:
    params: int
    kv_cache: int
    edit: int

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.edit


def footprint(cfg: ModelConfig, mesh: Any, dtype: Any = jnp.bfloat16, batch: int = 16, seq: int = 1024,
              rules: sharding.Rules = sharding.DEFAULT_RULES) -> Footprint:
    """Bytes on the fullest device of `mesh` (a Mesh or AbstractMesh) for `cfg` in `dtype`."""
    shapes = param_shapes(cfg, dtype)
    params = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        spec = sharding.spec_for(sharding.leaf_name(path), leaf.shape, sharding.logical_axes(path, len(leaf.shape)),
                                 mesh, rules, cfg, warned=set())
        params += _shard_bytes(leaf.shape, dtype, spec, mesh)
    rows = batch if batch % sharding.batch_axis_size(mesh, rules) else batch // sharding.batch_axis_size(mesh, rules)
    heads = sharding.spec_for("kv_cache", (cfg.num_kv_heads,), ("kv_heads",), mesh, rules, cfg, warned=set())[0]
    kv_heads = cfg.num_kv_heads // (mesh.shape[heads] if heads else 1)
    kv = kv_cache_bytes(cfg, rows, seq, dtype, kv_heads)
    f, d = cfg.intermediate_size, cfg.hidden_size
    solver = 2 * f * f * 4  # C and its factor, float32, one layer, whole on the device that solves
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    ft = 3 * 4 * mlp // (sharding.batch_axis_size(mesh, rules) * mesh.shape["tensor"])  # f32 copy + Adam m, v
    return Footprint(params, kv, max(solver, ft))


# Full-size configurations (from their config.json files), for the table and its test.
MODELS: dict[str, ModelConfig] = {
    "Llama-2-7B": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32, 128, 4096),
    "Llama-3-8B": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 8192, rope_theta=500000.0),
    "Mistral-7B": ModelConfig("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 32768),
    "Llama-2-70B": ModelConfig("llama", 32000, 8192, 28672, 80, 64, 8, 128, 4096),
}
# name -> (devices, GiB per device)
HARDWARE: dict[str, tuple[int, int]] = {"v4-8": (4, 32), "v5e-8": (8, 16), "v5e-16": (16, 16), "8xH100-80GB": (8, 80)}


def table(batch: int = 16, seq: int = 1024) -> str:
    """Markdown: GiB per device (params + KV cache + edit = total / capacity) with the default rules."""
    head = "| Model (bf16) | " + " | ".join(HARDWARE) + " |"
    lines = [head, "|" + "---|" * (len(HARDWARE) + 1)]
    for name, cfg in MODELS.items():
        cells = []
        for n, cap in HARDWARE.values():
            fp = footprint(cfg, abstract_mesh("", n), batch=batch, seq=seq)
            mark = "" if fp.total <= cap * GiB else " **does not fit**"
            cells.append(f"{fp.params / GiB:.1f} + {fp.kv_cache / GiB:.1f} + {fp.edit / GiB:.1f} = "
                         f"{fp.total / GiB:.1f} / {cap}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nGiB per device: params + KV cache (batch {batch} x {seq} slots) + edit working set = total / "
                 "capacity; mesh fsdp over every device (the default).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
