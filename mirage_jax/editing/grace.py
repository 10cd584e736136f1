"""GRACE: a discrete key-value codebook at one MLP down projection (spec 4.6).

The codebook is data in the returned pytree (``layers[L]["mlp"]["grace"]``, see
`mirage_jax.model.adapters`); the model's weights are never touched. One edit:

1. tokenise ``prompt + " " + target`` (target split in context); the query is the down-projection
   input at the last prompt token (one forward up to layer L, jitted);
2. codebook rule, on the host from a few scalars: empty or farther than ``eps + eps_nearest`` from
   every key -> new entry (key = query, radius ``eps``); within reach and the same label -> expand
   the nearest radius to the distance (``coverage``; ``moving_average`` also moves the key
   halfway); within reach and another label -> new entry and both radii halved (the old one
   minus 1e-5, as the seed). A full codebook doubles first;
3. ``n_iter`` steps of Adam(``edit_lr``) on the chosen entry's value in one jitted `fori_loop`,
   minimising the teacher-forced target NLL with the value substituted by the same forward that
   inference uses. Layers below L are run once (their output does not depend on the value).

Deviations from the seed, on purpose: an entry's label is a hash of the target's token ids (the
seed compares the *mean* of the label tensor, prompt positions included, so the same target after
prompts of different lengths "conflicts"); labels stay aligned with their keys (the seed prepends
labels while appending keys); the key position comes from the request, never from stale state.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirage_jax.editing.common import Reads, check_layers, for_case, loss_reads, read_nll, replace_mlp
from mirage_jax.model.adapters import GRACE_MODES, empty_grace, grace_distances, grow
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch


@dataclasses.dataclass(frozen=True)
class GRACEConfig:
    layer: int = 27  # MLP whose down projection carries the codebook (paper: llama-2-7b layer 27)
    edit_lr: float = 1.0  # Adam learning rate on the value
    n_iter: int = 50  # Adam steps per edit (all taken: the seed has no early stop)
    eps: float = 1.0  # initial radius of a new entry
    eps_expand: str = "coverage"  # 'coverage' or 'moving_average'
    replacement: str = "replace_last"  # 'replace_last', 'replace_prompt' or 'replace_all'
    val_init: str = "cold"  # 'cold': U[0, 1)^d; 'warm': the layer's own output at the key token
    seed: int = 0  # PRNG seed of cold values (folded with the entry index)
    capacity: int = 16  # initial codebook rows; doubled when full (a power of two keeps compilations few)


def target_label(ids: Sequence[int]) -> int:
    """An entry's label: a 31-bit hash of the target token ids (same target -> same label)."""
    return zlib.crc32(np.asarray(ids, np.int64).tobytes()) & 0x7FFFFFFF


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _probe(params, cfg: ModelConfig, layer: int, tokens, attn_mask, key_col, codebook):
    """Query (down-projection input at the last prompt token), the hidden state entering `layer`,
    the layer's own output there, and the nearest codebook entry with its distance."""
    out = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=layer + 1,
                  reads=(("layer_in", layer), ("mlp_key", layer)))
    query = jnp.take_along_axis(out.reads[("mlp_key", layer)], key_col[:, None, None], axis=1)[:, 0]
    down = params["layers"][layer]["mlp"]["down"]
    own = query @ down["kernel"] + (down["bias"] if "bias" in down else 0)
    dist = grace_distances(codebook["keys"], codebook["count"], query)[0]
    nearest = jnp.argmin(dist)
    return query[0].astype(jnp.float32), out.reads[("layer_in", layer)], own[0].astype(jnp.float32), nearest, \
        dist[nearest]


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _train_value(params, cfg: ModelConfig, hp: GRACEConfig, index, hidden, attn_mask, reads: Reads, prompt_len):
    """`hp.n_iter` Adam steps on ``values[index]`` of the codebook already in `params`; returns the
    trained value and the loss before the first and after the last step."""
    layer = hp.layer
    cb = params["layers"][layer]["mlp"]["grace"]

    def loss_fn(value):
        p = replace_mlp(params, {(layer, "grace"): dict(cb, values=cb["values"].at[index].set(value))})
        h = forward(p, cfg, None, attn_mask=attn_mask, start_layer=layer, hidden=hidden, prompt_len=prompt_len,
                    return_logits=False).hidden
        return read_nll(p, cfg, h, reads)

    opt = optax.adam(hp.edit_lr)
    grad = jax.grad(loss_fn)

    def step(_, carry):
        v, state = carry
        upd, state = opt.update(grad(v), state, v)
        return optax.apply_updates(v, upd), state

    v0 = cb["values"][index]
    v, _ = jax.lax.fori_loop(0, hp.n_iter, step, (v0, opt.init(v0)))
    return v, loss_fn(v0), loss_fn(v)


def _check(hp: GRACEConfig, cfg: ModelConfig) -> None:
    check_layers((hp.layer,), cfg.num_layers, "GRACE")
    if hp.replacement not in GRACE_MODES:
        raise ValueError(f"GRACE: replacement must be one of {', '.join(GRACE_MODES)}, got {hp.replacement!r}")
    if hp.eps_expand not in ("coverage", "moving_average"):
        raise ValueError(f"GRACE: eps_expand must be 'coverage' or 'moving_average', got {hp.eps_expand!r}")
    if hp.val_init not in ("cold", "warm"):
        raise ValueError(f"GRACE: val_init must be 'cold' or 'warm', got {hp.val_init!r}")
    if hp.capacity < 1 or hp.capacity & (hp.capacity - 1):
        raise ValueError(f"GRACE: capacity must be a power of two, got {hp.capacity}")


def codebook_rule(count: int, distance: float, eps_nearest: float, same_label: bool, hp: GRACEConfig) -> str:
    """The seed's decision at iteration 0: 'new', 'split', 'expand' or 'keep' (within the radius already)."""
    if count == 0 or distance > hp.eps + eps_nearest:
        return "new"
    if not same_label:
        return "split"
    return "expand" if distance > eps_nearest else "keep"


def grace_edit(params: Any, cfg: ModelConfig, tokenizer: Any, requests: Sequence[Any],
               hp: GRACEConfig) -> tuple[Any, dict]:
    """One GRACE edit -> (params with the updated codebook, info). The input pytree is untouched."""
    _check(hp, cfg)
    if len(requests) != 1:
        raise ValueError(f"GRACE edits one request at a time, got {len(requests)}")
    [r] = requests
    b = for_case(r, make_batch, tokenizer, [r.prompt], [r.target_new])
    layer = hp.layer
    mlp = params["layers"][layer]["mlp"]
    d_ff, d_model = mlp["down"]["kernel"].shape
    cb = dict(mlp["grace"]) if "grace" in mlp else empty_grace(hp.capacity, d_ff, d_model, hp.replacement)
    if int(cb["mode"]) != GRACE_MODES.index(hp.replacement):
        raise ValueError(f"GRACE: the codebook at layer {layer} replaces by {GRACE_MODES[int(cb['mode'])]!r}, "
                         f"this edit asks for {hp.replacement!r}")
    tokens, attn = jnp.asarray(b.tokens), jnp.asarray(b.attn_mask)
    query, hidden, own, nearest, dist = _probe(params, cfg, layer, tokens, attn, jnp.asarray(b.prompt_last), cb)
    count, nearest, dist = int(cb["count"]), int(nearest), float(dist)
    label = target_label(b.tokens[0][b.target_mask[0] > 0])
    eps_n = float(cb["eps"][nearest]) if count else 0.0
    action = codebook_rule(count, dist, eps_n, count > 0 and int(cb["labels"][nearest]) == label, hp)
    if action in ("new", "split"):
        if count == cb["keys"].shape[0]:
            cb = grow(cb)
        index = count
        if hp.val_init == "cold":
            value = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(hp.seed), index), (d_model,))
        else:
            value = own
        cb = dict(cb, keys=cb["keys"].at[index].set(query), values=cb["values"].at[index].set(value),
                  eps=cb["eps"].at[index].set(hp.eps), labels=cb["labels"].at[index].set(label),
                  count=jnp.int32(count + 1))
        if action == "split":
            cb["eps"] = cb["eps"].at[nearest].set(dist / 2 - 1e-5).at[index].set(dist / 2)
    else:
        index = nearest
        if action == "expand":
            cb["eps"] = cb["eps"].at[nearest].set(dist)
            if hp.eps_expand == "moving_average":
                cb["keys"] = cb["keys"].at[nearest].set(0.5 * cb["keys"][nearest] + 0.5 * query)
    edited = replace_mlp(params, {(layer, "grace"): cb})
    reads = loss_reads(b.tokens, b.target_mask, b.prompt_last, "target_new")
    value, loss0, loss = _train_value(edited, cfg, hp, jnp.int32(index), hidden, attn, reads, jnp.asarray(b.prompt_len))
    cb = dict(cb, values=cb["values"].at[index].set(value))
    info = {"action": action, "entry": index, "entries": int(cb["count"]), "capacity": int(cb["keys"].shape[0]),
            "distance": dist if count else None, "loss_before": float(loss0), "loss": float(loss)}
    return replace_mlp(params, {(layer, "grace"): cb}), info
