"""Adapters: extra leaves under a layer's ``mlp`` that change what that MLP returns.

An edit that installs an adapter (GRACE's codebook; WISE's side memory later) is still a function
from one parameter pytree to another: it returns params whose ``layers[l]["mlp"]`` carries the
adapter as leaves beside ``gate``/``up``/``down``, e.g.::

    mlp["grace"] = {"keys": [C, F] f32, "values": [C, D] f32, "eps": [C] f32, "labels": [C] int32,
                    "count": [] int32, "mode": [] int32}

and the forward applies every adapter it finds (`apply_mlp_adapters`). Generation, synthetic and
WILD evaluation, export and the runner therefore need no method-specific branch: they pass
params. Params without adapter leaves trace to exactly the program they always did (the branch
is a Python one, taken at trace time), so their logits are bit-identical and nothing recompiles.

Capacity C is a power of two; unused rows are masked by ``count``. A codebook grows by doubling
(`grow`), so a sequence of N edits compiles each jitted function about log2(N) times, not N.

Routing. An adapter whose decision depends on the prompt (GRACE: the nearest key to the
down-projection input at the last prompt token) makes it where that token is in the call and
returns it in ``routes``; a KV-cached decode step, which sees only the newest token, takes the
carried decision as input. That is what the seed's ``use_cache=False`` recomputation gives:
the prompt's activations never change as tokens are appended.

Export: the adapters go to `ADAPTER_FILE` (safetensors) beside the HF checkpoint, which itself
holds only the unedited weights of the edited layers; `load_adapters` grafts them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_FILE = "mirage_adapters.safetensors"
ADAPTER_NOTE = (f"This checkpoint was edited with an adapter method (mirage_jax). The edit is NOT in the "
                f"model weights: it lives in {ADAPTER_FILE}, which plain transformers ignores. Load the "
                f"directory with mirage_jax.model.load_model to get the edited model.")
GRACE_MODES = ("replace_last", "replace_prompt", "replace_all")
# leaf -> (dtype, shape in terms of C (capacity), F (d_ff), D (d_model)); () is a scalar
GRACE_LEAVES = {"keys": ("float32", ("C", "F")), "values": ("float32", ("C", "D")), "eps": ("float32", ("C",)),
                "labels": ("int32", ("C",)), "count": ("int32", ()), "mode": ("int32", ())}


class AdapterError(ValueError):
    """An adapter file or leaf does not match the model it is loaded into."""


# --- GRACE ------------------------------------------------------------------------------------


def empty_grace(capacity: int, d_ff: int, d_model: int, mode: str) -> dict:
    if mode not in GRACE_MODES:
        raise ValueError(f"GRACE replacement must be one of {', '.join(GRACE_MODES)}, got {mode!r}")
    return {"keys": jnp.zeros((capacity, d_ff), jnp.float32), "values": jnp.zeros((capacity, d_model), jnp.float32),
            "eps": jnp.zeros((capacity,), jnp.float32), "labels": jnp.zeros((capacity,), jnp.int32),
            "count": jnp.int32(0), "mode": jnp.int32(GRACE_MODES.index(mode))}


def grow(codebook: dict) -> dict:
    """The same codebook at twice its capacity (new rows zero, masked by ``count``)."""
    pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a)], axis=0)  # noqa: E731
    return {k: (pad(v) if jnp.ndim(v) else v) for k, v in codebook.items()}


def grace_distances(keys: jax.Array, count: jax.Array, query: jax.Array) -> jax.Array:
    """Euclidean distance of each query ``[B, F]`` to each key ``[C, F]`` -> ``[B, C]`` float32, +inf
    beyond ``count``. ``|q|^2 - 2 q.k + |k|^2`` in full precision (a ``[B, C, F]`` difference
    would not fit for 7B models with thousands of edits)."""
    q = query.astype(jnp.float32)
    cross = jnp.einsum("bf,cf->bc", q, keys, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(q * q, -1)[:, None] - 2 * cross + jnp.sum(keys * keys, -1)[None, :]
    d = jnp.sqrt(jnp.maximum(d2, 0.0))
    return jnp.where(jnp.arange(keys.shape[0])[None, :] < count, d, jnp.inf)


def key_index(positions: jax.Array, prompt_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column of each row's last prompt token in this call and whether it is in this call at all.
    Left padding gives pads position 0, so the *last* column with that position is the real one."""
    at_key = positions == (prompt_len - 1)[:, None]
    t = positions.shape[1]
    return t - 1 - jnp.argmax(at_key[:, ::-1], axis=1), jnp.any(at_key, axis=1)


def grace_apply(cb: Mapping[str, jax.Array], key: jax.Array, out: jax.Array, positions: jax.Array,
                prompt_len: jax.Array, carried: Mapping[str, jax.Array] | None) -> tuple[jax.Array, dict]:
    """GRACE at one layer (spec 4.6): the query is the down-projection input ``key`` ``[B, T, F]`` at
    the last prompt token; if its nearest key is within that entry's radius, the MLP output ``out``
    ``[B, T, D]`` is replaced by the entry's value at the last prompt token (``replace_last``), at
    the tokens before it (``replace_prompt``, the GRACE release's ``[:, :key_id]``) or everywhere,
    generated tokens included (``replace_all``). Differentiable in ``cb["values"]``."""
    col, present = key_index(positions, prompt_len)
    query = jnp.take_along_axis(key, col[:, None, None], axis=1)[:, 0]
    dist = grace_distances(cb["keys"], cb["count"], query)
    nearest = jnp.argmin(dist, axis=1)
    hit = present & (jnp.take_along_axis(dist, nearest[:, None], 1)[:, 0] <= cb["eps"][nearest])
    value = cb["values"][nearest]
    if carried is not None:  # a decode step: the prompt's decision, made at prefill
        hit = jnp.where(present, hit, carried["hit"])
        value = jnp.where(present[:, None], value, carried["value"])
    rel = positions - (prompt_len - 1)[:, None]
    mode = cb["mode"]
    where = jnp.where(mode == 0, rel == 0, jnp.where(mode == 1, rel < 0, True)) & hit[:, None]
    return jnp.where(where[..., None], value[:, None, :].astype(out.dtype), out), {"hit": hit, "value": value}


# --- WISE -------------------------------------------------------------------------------------

WISE_ROUTERS = ("prompt", "sequence")
NO_ACT = 1e9  # the seed's EditingMeanAct start: a memory without edits never passes its threshold
# memories[0] is the side memory being written, memories[1:count] the saved shards (oldest first)
WISE_LEAVES = {"memories": (None, ("C", "F", "D")), "min_act": ("float32", ("C",)), "count": ("int32", ()),
               "edits": ("int32", ()), "act_ratio": ("float32", ()), "router": ("int32", ()),
               "gelu": ("int32", ()), "bias": (None, ("D",))}
LONG_SEQUENCE = 100  # the seed's euc(infer=True): over 100 tokens the distance is the top-1 token's


def empty_wise(down_kernel: jax.Array, capacity: int, act_ratio: float, router: str, gelu: bool,
               bias: jax.Array | None = None) -> dict:
    """A WISE adapter whose side memory is a copy of the down kernel ``[F, D]`` (no shards yet).
    ``bias``: the down projection's (GPT-J's fc_out has one), part of every memory's output as of
    the original's -- a copy of the layer includes its bias; zeros where the model has none."""
    if router not in WISE_ROUTERS:
        raise ValueError(f"WISE router must be one of {', '.join(WISE_ROUTERS)}, got {router!r}")
    mem = jnp.zeros((capacity,) + down_kernel.shape, down_kernel.dtype).at[0].set(down_kernel)
    return {"memories": mem, "min_act": jnp.full((capacity,), NO_ACT, jnp.float32), "count": jnp.int32(1),
            "edits": jnp.int32(0), "act_ratio": jnp.float32(act_ratio), "router": jnp.int32(WISE_ROUTERS.index(router)),
            "gelu": jnp.int32(gelu),
            "bias": jnp.zeros(down_kernel.shape[1:], down_kernel.dtype) if bias is None
            else bias.astype(down_kernel.dtype)}


def wise_act(gelu: jax.Array, x: jax.Array) -> jax.Array:
    """The model's MLP activation, which the seed applies to the down-projection *outputs* before
    comparing them (spec 4.7)."""
    return jnp.where(gelu > 0, jax.nn.gelu(x, approximate=True), jax.nn.silu(x))


def wise_token_distances(w: Mapping[str, jax.Array], key: jax.Array, out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each memory's output ``key @ memory + bias`` ``[B, T, C, D]`` and its per-token distance to
    the main output ``out``: ``|act(side) - act(out)|_2`` ``[B, T, C]`` float32."""
    side = jnp.einsum("btf,cfd->btcd", key, w["memories"].astype(key.dtype)) + w["bias"].astype(key.dtype)
    a_side = wise_act(w["gelu"], side.astype(jnp.float32))
    a_out = wise_act(w["gelu"], out.astype(jnp.float32))[:, :, None, :]
    return side, jnp.linalg.norm(a_side - a_out, axis=-1)


def wise_choice(stat: jax.Array, min_act: jax.Array, count: jax.Array, act_ratio: jax.Array) -> jax.Array:
    """The seed's retrieval rule on per-memory distances ``stat`` ``[B, C]`` -> ``[B]``: -1 = the
    original output, else the memory index. The side memory (0) is used when its distance reaches
    ``act_ratio x`` its minimum recorded edit distance; a shard takes over when its distance
    exceeds both the current best (starting at the side memory's, whether or not that was used)
    and its own threshold."""
    thr = act_ratio * min_act
    choice = jnp.where(stat[:, 0] < thr[0], -1, 0)
    best = stat[:, 0]
    for i in range(1, stat.shape[1]):
        take = (i < count) & (stat[:, i] > best) & (stat[:, i] > thr[i])
        choice = jnp.where(take, i, choice)
        best = jnp.where(take, stat[:, i], best)
    return choice


def real_tokens(positions: jax.Array) -> jax.Array:
    """``[B, T]`` bool: not left padding. Pads have position 0, as has the first real token, which
    is the *last* column with position 0 (a decode step has none: all its tokens are real)."""
    col, present = key_index(positions, jnp.ones(positions.shape[:1], jnp.int32))
    return ~present[:, None] | (jnp.arange(positions.shape[1])[None, :] >= col[:, None])


def wise_apply(w: Mapping[str, jax.Array], key: jax.Array, out: jax.Array, positions: jax.Array,
               prompt_len: jax.Array, carried: Mapping[str, jax.Array] | None) -> tuple[jax.Array, dict]:
    """WISE at one layer (spec 4.7): per row, the original MLP output, the side memory's or a
    shard's, chosen by `wise_choice` on the mean per-token distance (the maximum beyond
    `LONG_SEQUENCE` tokens) over the tokens seen so far -- all real tokens (router ``sequence``,
    the seed's recomputation over the growing sequence: a decode step can switch, and says so in
    ``switched``) or only the prompt's (router ``prompt``: decided at prefill, kept). The running
    sums travel in the route, so a KV-cached step costs one token. A route with ``fixed`` (the
    decode loop's recomputation after a switch) imposes its choice and changes nothing."""
    side, dist = wise_token_distances(w, key, out)
    b = key.shape[0]
    if carried is not None and "fixed" in carried:
        choice, route = carried["choice"], {k: v for k, v in carried.items() if k != "fixed"}
    else:
        counted = real_tokens(positions) & ((w["router"] == 1) | (positions < prompt_len[:, None]))
        cf = counted.astype(jnp.float32)[..., None]
        c = w["memories"].shape[0]
        prev = carried or {"sum": jnp.zeros((b, c)), "max": jnp.zeros((b, c)), "n": jnp.zeros((b,), jnp.int32),
                           "choice": jnp.full((b,), -1, jnp.int32)}
        total = prev["sum"] + jnp.sum(dist * cf, axis=1)
        top = jnp.maximum(prev["max"], jnp.max(dist * cf, axis=1))
        n = prev["n"] + jnp.sum(counted, axis=1).astype(jnp.int32)
        stat = jnp.where((n > LONG_SEQUENCE)[:, None], top, total / jnp.maximum(n, 1)[:, None])
        choice = wise_choice(stat, w["min_act"], w["count"], w["act_ratio"])
        switched = jnp.zeros((b,), bool) if carried is None else choice != prev["choice"]
        route = {"sum": total, "max": top, "n": n, "choice": choice, "switched": switched}
    picked = jnp.take_along_axis(side, jnp.maximum(choice, 0)[:, None, None, None], axis=2)[:, :, 0]
    return jnp.where((choice >= 0)[:, None, None], picked.astype(out.dtype), out), route


def grow_wise(w: dict) -> dict:
    """The same adapter with room for twice as many memories (new rows zero, masked by ``count``)."""
    c = w["memories"].shape[0]
    return dict(w, memories=jnp.concatenate([w["memories"], jnp.zeros_like(w["memories"])]),
                min_act=jnp.concatenate([w["min_act"], jnp.full((c,), NO_ACT, jnp.float32)]))


# --- the forward's entry point ------------------------------------------------------------------

# adapter leaf name -> function (leaves, key, out, positions, prompt_len, carried) -> (out, route)
ADAPTERS = {"grace": grace_apply, "wise": wise_apply}


def mlp_adapters(mlp: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(name for name in ADAPTERS if name in mlp)


def apply_mlp_adapters(mlp: Mapping[str, Any], key: jax.Array, out: jax.Array, positions: jax.Array,
                       prompt_len: jax.Array | None, carried: Mapping[str, Any] | None) -> tuple[jax.Array, dict]:
    """Every adapter present in ``mlp``, in `ADAPTERS` order, on the MLP output ``out``.

    ``prompt_len`` ``[B]``: real prompt tokens per row (the last prompt token has position
    ``prompt_len - 1``); None means every token of the call is prompt (a plain forward).
    ``carried``: the routes a previous call of the same sequence returned (decode steps)."""
    if prompt_len is None:
        prompt_len = positions[:, -1] + 1
    routes = {}
    for name in mlp_adapters(mlp):
        out, routes[name] = ADAPTERS[name](mlp[name], key, out, positions, prompt_len,
                                           None if carried is None else carried[name])
    return out, routes


def has_adapters(params: Mapping[str, Any]) -> bool:
    return any(mlp_adapters(layer["mlp"]) for layer in params["layers"])


def strip_adapters(params: Mapping[str, Any]) -> dict:
    """The params without any adapter (the unedited model, for adapter-only edits)."""
    layers = [dict(layer, mlp={k: v for k, v in layer["mlp"].items() if k not in ADAPTERS})
              for layer in params["layers"]]
    return dict(params, layers=layers)


# --- export / import ----------------------------------------------------------------------------


def save_adapters(params: Mapping[str, Any], out_dir: str | Path) -> Path | None:
    """Write every adapter leaf as ``layers.{l}.mlp.{adapter}.{leaf}`` into `ADAPTER_FILE` (multi-host:
    gathered on every process, written by process 0)."""
    from safetensors.numpy import save_file

    from mirage_jax import distributed

    tensors = {f"layers.{i}.mlp.{name}.{leaf}": np.asarray(distributed.fetch(v))
               for i, layer in enumerate(params["layers"]) for name in mlp_adapters(layer["mlp"])
               for leaf, v in layer["mlp"][name].items()}
    if not tensors:
        return None
    path = Path(out_dir) / ADAPTER_FILE
    if not distributed.is_writer():
        return path
    save_file(tensors, str(path), metadata={"format": "mirage_jax-adapters", "note": ADAPTER_NOTE})
    return path


def load_adapters(params: Mapping[str, Any], cfg: Any, ckpt_dir: str | Path) -> Mapping[str, Any]:
    """`params` with the adapters of `ADAPTER_FILE` in ``ckpt_dir`` (unchanged when there is none).
    A file that does not match the model is a one-line `AdapterError` naming the leaf."""
    path = Path(ckpt_dir) / ADAPTER_FILE
    if not path.exists():
        return params
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own types for truncation/corruption
        raise AdapterError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    grouped: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        parts = name.split(".")
        if len(parts) != 5 or parts[0] != "layers" or parts[2] != "mlp" or not parts[1].isdigit():
            raise AdapterError(f"{path}: unexpected tensor {name!r}; expected layers.<l>.mlp.<adapter>.<leaf>")
        layer, adapter, leaf = int(parts[1]), parts[3], parts[4]
        if not 0 <= layer < cfg.num_layers:
            raise AdapterError(f"{path}: {name}: layer {layer} out of range; the model has layers "
                               f"0..{cfg.num_layers - 1}")
        if adapter not in ADAPTERS:
            raise AdapterError(f"{path}: {name}: unknown adapter {adapter!r}; known: {', '.join(ADAPTERS)}")
        grouped.setdefault((layer, adapter), {})[leaf] = arr
    layers = list(params["layers"])
    for (layer, adapter), leaves in sorted(grouped.items()):
        _check_leaves(path, layer, adapter, leaves, layers[layer]["mlp"]["down"]["kernel"])
        mlp = dict(layers[layer]["mlp"], **{adapter: {k: jnp.asarray(v) for k, v in leaves.items()}})
        layers[layer] = dict(layers[layer], mlp=mlp)
    return dict(params, layers=layers)


def _check_leaves(path: Path, layer: int, adapter: str, leaves: Mapping[str, np.ndarray], down: jax.Array) -> None:
    where = f"{path}: layers.{layer}.mlp.{adapter}"
    spec = GRACE_LEAVES if adapter == "grace" else WISE_LEAVES
    down_shape = down.shape
    missing = sorted(set(spec) - set(leaves))
    if missing:
        raise AdapterError(f"{where}.{missing[0]} is missing")
    first = leaves["keys" if adapter == "grace" else "memories"]
    capacity = first.shape[0] if first.ndim else -1
    sizes = {"C": capacity, "F": down_shape[0], "D": down_shape[1]}
    for leaf, (dtype, dims) in spec.items():
        dtype = dtype or str(down.dtype)
        want = tuple(sizes[d] for d in dims)
        got = leaves[leaf]
        if got.shape != want or str(got.dtype) != dtype:
            raise AdapterError(f"{where}.{leaf}: {got.dtype}{list(got.shape)} does not match this model "
                               f"(expected {dtype}{list(want)}: d_ff={down_shape[0]}, d_model={down_shape[1]})")
    if adapter == "wise":
        if not 1 <= int(leaves["count"]) <= capacity or not 0 <= int(leaves["router"]) < len(WISE_ROUTERS):
            raise AdapterError(f"{where}: count {int(leaves['count'])} / router {int(leaves['router'])} out of range")
        return
    if not 0 <= int(leaves["count"]) <= capacity or not 0 <= int(leaves["mode"]) < len(GRACE_MODES):
        raise AdapterError(f"{where}: count {int(leaves['count'])} / mode {int(leaves['mode'])} out of range")

