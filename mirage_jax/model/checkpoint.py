"""HF checkpoints <-> parameter pytrees, through one table of names per family.

Each table row says which HF tensor(s) make which pytree leaf (leaves) and how (transpose,
split, rotary permutation). Import walks the table forward, export walks it backward, so the two
directions cannot drift apart (the levanter habit: conversion is its own module with a table).

Import is lazy: tensors are read one at a time from the safetensors files and cast to the
requested dtype on the device before the next is read, so a 7B checkpoint never needs twice its
size in host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed
from mirage_jax.model import sharding
from mirage_jax.model.config import ModelConfig, config_from_hf
from mirage_jax.model.transformer import params_dtype

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be read (missing, truncated, incomplete...)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a conversion table: HF tensor `hf` <-> pytree leaves `paths`."""

    hf: str
    paths: tuple[tuple[Any, ...], ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    # One-to-one rows: ours is the HF tensor (False) or its transpose (True), so a sharded load can
    # read each device's slice straight from the file. None: split / permuted rows, read whole.
    transposed: bool | None = None


def _same(a):
    return (a,)


def _t(a):
    return (a.T,)


def _one(path, hf, transpose=False):
    return Entry(hf, (path,), _t if transpose else _same, (lambda a: a.T) if transpose else (lambda a: a), transpose)


def _rotary_perm(cfg: ModelConfig, n_heads: int) -> np.ndarray:
    """Output-feature permutation turning GPT-J's interleaved rotary into rotate-half layout.

    Attention scores only depend on q.k, so permuting q and k features the same way inside each
    head changes nothing but lets one RoPE implementation serve every family.
    """
    r, hd = cfg.rope_dim, cfg.head_dim
    within = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, hd)])
    return (np.arange(n_heads)[:, None] * hd + within[None, :]).reshape(-1)


def _permuted(path, hf, perm):
    inv = np.argsort(perm)
    return Entry(hf, (path,), lambda a: (a[perm].T,), lambda a: a.T[inv])


def conversion_table(cfg: ModelConfig, prefix: str = "") -> list[Entry]:
    """All rows for a model; `prefix` is 'transformer.' / 'model.' as found in the files."""
    rows: list[Entry] = []
    f = cfg.family
    if f in ("llama", "qwen2"):
        p = prefix or "model."
        rows.append(_one(("embed", "embedding"), f"{p}embed_tokens.weight"))
        for i in range(cfg.num_layers):
            L = f"{p}layers.{i}."
            lp = ("layers", i)
            rows.append(_one(lp + ("attn_norm", "scale"), L + "input_layernorm.weight"))
            rows.append(_one(lp + ("mlp_norm", "scale"), L + "post_attention_layernorm.weight"))
            for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                rows.append(_one(lp + ("attn", ours, "kernel"), f"{L}self_attn.{hf}.weight", True))
                bias = cfg.attn_bias if ours != "o" else cfg.attn_out_bias
                if bias:
                    rows.append(_one(lp + ("attn", ours, "bias"), f"{L}self_attn.{hf}.bias"))
            for ours in ("gate", "up", "down"):
                rows.append(_one(lp + ("mlp", ours, "kernel"), f"{L}mlp.{ours}_proj.weight", True))
                if cfg.mlp_bias:
                    rows.append(_one(lp + ("mlp", ours, "bias"), f"{L}mlp.{ours}_proj.bias"))
        rows.append(_one(("final_norm", "scale"), f"{p}norm.weight"))
        if not cfg.tie_word_embeddings:
            rows.append(_one(("lm_head", "kernel"), "lm_head.weight", True))
        return rows
    p = prefix
    rows.append(_one(("embed", "embedding"), f"{p}wte.weight"))
    if cfg.learned_positions:
        rows.append(_one(("pos_embed", "embedding"), f"{p}wpe.weight"))
    for i in range(cfg.num_layers):
        L, lp = f"{p}h.{i}.", ("layers", i)
        for ours, hf in (("attn_norm", "ln_1"),) + ((("mlp_norm", "ln_2"),) if f == "gpt2" else ()):
            rows.append(_one(lp + (ours, "scale"), f"{L}{hf}.weight"))
            rows.append(_one(lp + (ours, "bias"), f"{L}{hf}.bias"))
        if f == "gpt2":  # Conv1D weights are already [in, out]; c_attn holds q|k|v side by side.
            for kind, hf in (("kernel", "weight"), ("bias", "bias")):
                qkv = tuple(lp + ("attn", n, kind) for n in ("q", "k", "v"))
                rows.append(Entry(f"{L}attn.c_attn.{hf}", qkv, lambda a: tuple(np.split(a, 3, axis=-1)),
                                  lambda *a: np.concatenate(a, axis=-1)))
            for (grp, n), hf in ((("attn", "o"), "attn.c_proj"), (("mlp", "up"), "mlp.c_fc"),
                                 (("mlp", "down"), "mlp.c_proj")):
                rows.append(_one(lp + (grp, n, "kernel"), f"{L}{hf}.weight"))
                rows.append(_one(lp + (grp, n, "bias"), f"{L}{hf}.bias"))
        else:  # GPT-J
            perm = _rotary_perm(cfg, cfg.num_heads)
            rows.append(_permuted(lp + ("attn", "q", "kernel"), f"{L}attn.q_proj.weight", perm))
            rows.append(_permuted(lp + ("attn", "k", "kernel"), f"{L}attn.k_proj.weight", perm))
            rows.append(_one(lp + ("attn", "v", "kernel"), f"{L}attn.v_proj.weight", True))
            rows.append(_one(lp + ("attn", "o", "kernel"), f"{L}attn.out_proj.weight", True))
            for n, hf in (("up", "fc_in"), ("down", "fc_out")):
                rows.append(_one(lp + ("mlp", n, "kernel"), f"{L}mlp.{hf}.weight", True))
                rows.append(_one(lp + ("mlp", n, "bias"), f"{L}mlp.{hf}.bias"))
    rows.append(_one(("final_norm", "scale"), f"{p}ln_f.weight"))
    rows.append(_one(("final_norm", "bias"), f"{p}ln_f.bias"))
    if not cfg.tie_word_embeddings:
        rows.append(_one(("lm_head", "kernel"), "lm_head.weight", True))
        if cfg.lm_head_bias:
            rows.append(_one(("lm_head", "bias"), "lm_head.bias"))
    return rows


def _set(tree: dict, path: tuple, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _listify_layers(tree: dict, n: int) -> dict:
    layers = tree.get("layers", {})
    tree["layers"] = [layers[i] for i in range(n)]
    return tree


def _prefix(cfg: ModelConfig, names: set[str]) -> str:
    if cfg.family in ("llama", "qwen2"):
        return "model."
    return "transformer." if "transformer.wte.weight" in names else ""


Placement = Callable[[tuple, tuple[int, ...]], Any]  # (leaf path, shape) -> jax.sharding.Sharding


class Slices:
    """A tensor that can be read in pieces: `shape` and `[index]` (numpy arrays qualify as they are;
    safetensors' lazy slices are wrapped so that reading a device's slice reads only those bytes)."""

    def __init__(self, lazy: Any):
        self._lazy = lazy
        self.shape = tuple(lazy.get_shape())

    def __getitem__(self, index: tuple) -> np.ndarray:
        return self._lazy[index]


def _sharded(shape: tuple[int, ...], sharding: Any, read: Callable[[tuple], np.ndarray], dtype: Any) -> jax.Array:
    """A global array built device slice by device slice: each addressable device's `read(index)`
    is cast and transferred before the next is read, so the host holds one slice at a time."""
    return jax.make_array_from_callback(shape, sharding, lambda idx: np.ascontiguousarray(read(idx)).astype(dtype))


def _read_slice(src: Any, transposed: bool, index: tuple) -> np.ndarray:
    """Our leaf's `index` read from the HF tensor `src` (the transpose folded into the index)."""
    index = tuple(index) + (slice(None),) * (len(src.shape) - len(index))
    return src[index[::-1]].T if transposed else src[index]


def convert_to_params(
    cfg: ModelConfig,
    names: set[str] | Mapping[str, Any],
    get: Callable[[str], np.ndarray],
    dtype: Any = jnp.float32,
    where: str = "checkpoint",
    *,
    placement: Placement | None = None,
    get_slices: Callable[[str], Any] | None = None,
) -> dict:
    """Build the pytree by pulling each HF tensor through `get`, one at a time.

    With `placement` (leaf path, shape -> sharding) every leaf is built on its devices from
    slices; with `get_slices` too, one-to-one rows are read from the file slice by slice (the
    transpose folded into the index), so no process ever holds a whole tensor it does not need.
    """
    names = set(names)
    table = conversion_table(cfg, _prefix(cfg, names))
    missing = [e.hf for e in table if e.hf not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more} for model_type {cfg.model_type!r}")
    tree: dict = {}
    for e in table:
        if placement is not None and get_slices is not None and e.transposed is not None:
            src = get_slices(e.hf)
            shape = tuple(reversed(src.shape)) if e.transposed else tuple(src.shape)
            read = functools.partial(_read_slice, src, e.transposed)
            _set(tree, e.paths[0], _sharded(shape, placement(e.paths[0], shape), read, dtype))
            continue
        arr = get(e.hf)
        for path, part in zip(e.paths, e.to_ours(arr)):
            part = np.ascontiguousarray(part)
            if placement is None:
                _set(tree, path, jnp.asarray(part, dtype))
            else:
                _set(tree, path, _sharded(part.shape, placement(path, part.shape), part.__getitem__, dtype))
        del arr
    return _listify_layers(tree, cfg.num_layers)


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) in HF layout, tensor by tensor (export)."""
    prefix = "transformer." if cfg.family in ("gpt2", "gptj") else ""
    for e in conversion_table(cfg, prefix):
        parts = [np.asarray(distributed.fetch(_get(params, p))) for p in e.paths]
        yield e.hf, np.ascontiguousarray(e.to_hf(*parts))


# --- safetensors directories -----------------------------------------------------------------


def _safetensor_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: unreadable index file ({err})") from None
        files = sorted({ckpt / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard {f.name} is missing")
        return files
    # an adapter file written beside the weights (`adapters.ADAPTER_FILE`, GRACE) holds no HF tensors
    return sorted(f for f in ckpt.glob("*.safetensors") if f.name != "mirage_adapters.safetensors")


def _open_safetensors(files: list[Path]):
    """name -> (file) map plus a getter; a truncated or corrupt file is a one-line error."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors needs it)
    from safetensors import safe_open

    handles, where = {}, {}
    for f in files:
        try:
            h = safe_open(str(f), framework="numpy")
            keys = list(h.keys())
        except Exception as err:  # safetensors raises its own types for truncation/corruption
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(err).__name__}: {err})") from None
        handles[f] = h
        for k in keys:
            where[k] = f

    def get(name: str) -> np.ndarray:
        try:
            return handles[where[name]].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{where[name]}: cannot read tensor {name!r} ({err})") from None

    def get_slices(name: str) -> Slices:
        return Slices(handles[where[name]].get_slice(name))

    return where, get, get_slices


def _torch_bin(files: list[Path]):
    import torch

    state: dict[str, np.ndarray] = {}
    for f in files:
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
        state.update({k: v.float().numpy() for k, v in sd.items()})
    return state, state.__getitem__, state.__getitem__


def read_hf_config(ckpt: Path) -> dict:
    cfg_file = ckpt / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{ckpt}: no config.json (not a HuggingFace checkpoint directory)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({err})") from None


def load_hf_checkpoint(
    path: str | os.PathLike, dtype: str = "float32", allow_pickle: bool = False, mesh: Any = None
) -> tuple[ModelConfig, dict, dict]:
    """Read an HF checkpoint directory -> (ModelConfig, params, raw config dict). No torch.

    `mesh`: load straight into shards laid out by `sharding.placement` (see `convert_to_params`).
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory does not exist")
    hf_cfg = read_hf_config(ckpt)
    cfg = config_from_hf(hf_cfg, where=str(ckpt / "config.json"))
    files = _safetensor_files(ckpt)
    if files:
        names, get, get_slices = _open_safetensors(files)
    else:
        bins = sorted(ckpt.glob("*.bin"))
        if not bins:
            raise CheckpointError(f"{ckpt}: no *.safetensors weights found")
        if not allow_pickle:
            raise CheckpointError(
                f"{ckpt}: only pickle *.bin weights found; they can execute code when loaded. "
                "Convert to safetensors or pass allow_pickle=True (--allow_pickle) if you trust them"
            )
        names, get, get_slices = _torch_bin(bins)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    place = sharding.placement(mesh, cfg) if mesh is not None else None
    params = convert_to_params(cfg, names, get, DTYPES[dtype], where=str(ckpt), placement=place,
                               get_slices=get_slices)
    return cfg, params, hf_cfg


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Mapping[str, Any],
    hf_config: Mapping[str, Any],
    tokenizer: Any | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write params as an HF safetensors checkpoint (sharded with an index beyond the limit).

    Multi-host: every process gathers the tensors (a collective), process 0 alone writes."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import save_file

    out = Path(out_dir)
    dtype = str(params_dtype(params))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in params_to_hf(cfg, params):
        if size + arr.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if not distributed.is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(a.nbytes for s in shards for a in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = dict(hf_config)
    # transformers >= 4.56 reads "dtype" (a stale one from the source config would win), older
    # releases "torch_dtype": write both so either loads the checkpoint in its real precision.
    config["dtype"] = config["torch_dtype"] = dtype
    config.setdefault("architectures", [_ARCH[cfg.model_type]])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gptj": "GPTJForCausalLM",
}
