"""The decoder: one functional forward pass for every supported family.

Parameters are a plain pytree (Flax naming: ``kernel`` is ``[in, out]``, ``scale``/``bias`` for
norms, ``embedding`` for tables):

    {"embed": {"embedding": [V, D]},
     "pos_embed": {"embedding": [P, D]},                      # GPT-2 only
     "layers": [ {"attn_norm": {...},
                  "attn": {"q"|"k"|"v"|"o": {"kernel", "bias"?}},
                  "mlp_norm": {...},                          # absent with a parallel residual
                  "mlp": {"gate"?: ..., "up": ..., "down": {"kernel": [F, D], "bias"?}}}, ...],
     "final_norm": {"scale", "bias"?},
     "lm_head": {"kernel": [D, V], "bias"?}}                  # absent with tied embeddings

Layers are a Python list (not a stacked array) so that an edit replaces one leaf,
``params["layers"][l]["mlp"]["down"]["kernel"]``, without copying the other layers; the forward
unrolls the layer loop, which is what the hooks below need anyway.

Hooks are arguments, not global state (the penzai habit):
- ``reads``: static tuple of ``(site, layer)``; the output carries those activations ``[B, T, X]``.
- ``adds``: pytree ``{(site, layer): (index [B], vector [B, X])}``; the vector is added to that
  site at one token position per row (differentiable in ``vector``).
- ``start_layer`` + ``hidden``: run the stack from layer ``start_layer`` given the hidden state
  entering it, so an optimisation at layer L never recomputes the layers below L.

Sites: ``layer_in`` (residual entering the layer), ``mlp_in`` (normed MLP input, the input of the
gate/up projections; MEND's x), ``mlp_key`` (input of the MLP down
projection, the ROME/MEMIT key k), ``mlp_out`` (MLP output, the ROME value), ``residual``
(hidden state leaving the layer, MEMIT's z).

Adapters (`mirage_jax.model.adapters`): leaves such as ``mlp["grace"]`` beside the MLP kernels are
applied to the MLP output (before the ``mlp_out`` hook) wherever present; ``prompt_len`` tells them
which token is each row's last prompt token and ``routes`` carries their per-row decisions from the
prefill to KV-cached decode steps. Params without such leaves run exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.adapters import apply_mlp_adapters, mlp_adapters
from mirage_jax.model.config import ModelConfig, rope_inv_freq
from mirage_jax.model.stack import EditStack, mlp_stacks, per_member

Params = Mapping[str, Any]
Site = tuple[str, int]
SITES = ("layer_in", "mlp_in", "mlp_key", "mlp_out", "residual")


K_SLOT_AXIS, V_SLOT_AXIS = 3, 2  # where a cache layer's slots lie (see `KVCache`)


class KVCache(NamedTuple):
    """Per-layer keys ``[B, H_kv, hd, S]`` and values ``[B, H_kv, S, hd]``; slot j of every row is
    absolute slot j.

    Why heads-major, with the keys' slots minor: a decode step's attention (`_attend_one`) reduces
    each key over hd and the values over the slots, and XLA's CPU loops vectorise along the minor
    axis -- with both in the projections' ``[B, S, H_kv, hd]`` layout the key reduction ran along hd
    (a horizontal sum per slot): 128 rows x 192 slots took 3.3-4.1 ms a layer, 1.7 in this layout
    (BUILD_NOTES, stop 21). A prompt's einsums read either layout as batched matmuls."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def slots(self) -> int:
        return self.k[0].shape[K_SLOT_AXIS]


def kv_shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one layer's keys and values in a cache of `length` slots (`KVCache`)."""
    return (batch, cfg.num_kv_heads, cfg.head_dim, length), (batch, cfg.num_kv_heads, length, cfg.head_dim)


def map_slots(fn: Any, *caches: KVCache) -> KVCache:
    """``fn(*arrays, axis)`` on every layer's keys and values of `caches`, `axis` their slot axis
    (layers a cache leaves empty, None, stay None): one place that knows the layout."""
    def each(xs: Sequence[Any], axis: int) -> Any:
        return None if xs[0] is None else fn(*xs, axis)

    return KVCache([each(xs, K_SLOT_AXIS) for xs in zip(*(c.k for c in caches))],
                   [each(xs, V_SLOT_AXIS) for xs in zip(*(c.v for c in caches))])


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None when ``return_logits=False``)
    reads: dict[Site, jax.Array]
    cache: KVCache | None
    hidden: jax.Array  # final hidden state before the final norm, [B, T, D]
    routes: dict | None = None  # {layer: adapter decisions}, empty without adapters (see `forward`)


def params_dtype(params: Any) -> Any:
    """The dtype of a parameter tree's arrays: the KV cache's and an exported checkpoint's."""
    return jax.tree_util.tree_leaves(params)[0].dtype


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> KVCache:
    k_shape, v_shape = kv_shapes(cfg, batch, length)
    return KVCache([jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)],
                   [jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)])


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Token positions for a left-padded batch: 0 at the first real token of each row."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# --- building blocks -------------------------------------------------------------------------


def _dense(p: Params, x: jax.Array, dtype: Any = None) -> jax.Array:
    """``x @ kernel (+ bias)``, accumulated in float32 and rounded once to `dtype` (default: x's), as
    GPU matmul units (and PyTorch) do for bfloat16. Why explicit: XLA's CPU dot with a bfloat16
    *result* is ~8x slower than one with a float32 result (30 MLPs of the default model at 8 rows:
    125 vs 14.5 ms), which made `--dtype=bfloat16` decode 4x slower than float32 on a CPU."""
    y = jnp.dot(x, p["kernel"], preferred_element_type=jnp.float32).astype(dtype or x.dtype)
    return y + p["bias"] if "bias" in p else y


def _norm(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if cfg.norm == "rms":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        return p["scale"] * y.astype(x.dtype)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def _act(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    return jax.nn.silu(x) if cfg.activation == "silu" else jax.nn.gelu(x, approximate=True)


def _rope(cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first ``rope_dim`` dims of each head (GPT-J weights are permuted
    at load time so that its interleaved rotary becomes this layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, r/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    r = cfg.rope_dim
    rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class Placement(NamedTuple):
    """Where this call's T tokens sit: the same for every layer of one forward."""

    positions: jax.Array  # [B, T] RoPE / position-table index of each token
    # [B, S] key slots holding real tokens (S = T without a cache, the cache length with one), or
    # [B, T, S] which key each query may see besides causality (several sequences packed in a row)
    key_mask: jax.Array
    cache_index: jax.Array | int  # cache slot of the first of the T tokens (0 without a cache)


def _attention(
    cfg: ModelConfig,
    p: Params,
    x: jax.Array,
    where: Placement,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    query_at: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    positions, key_mask, cache_index = where
    b, t, _ = x.shape
    hq, hk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    k = _dense(p["k"], x).reshape(b, t, hk, hd)
    v = _dense(p["v"], x).reshape(b, t, hk, hd)
    if query_at is not None:
        return _attend_at(cfg, p, x, where, k, v, query_at), None
    q = _dense(p["q"], x).reshape(b, t, hq, hd)
    if not cfg.learned_positions:
        q, k = _rope(cfg, q, positions), _rope(cfg, k, positions)
    new_cache = None
    if cache_kv is not None:  # into the cache's layout (`KVCache`), which the attention then reads
        ck = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.transpose(0, 2, 3, 1).astype(cache_kv[0].dtype),
                                                 cache_index, K_SLOT_AXIS)
        cv = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.transpose(0, 2, 1, 3).astype(cache_kv[1].dtype),
                                                 cache_index, V_SLOT_AXIS)
        new_cache = (ck, cv)
    s = t if cache_kv is None else new_cache[0].shape[K_SLOT_AXIS]
    seen = key_mask[:, None, :] if key_mask.ndim == 2 else key_mask
    allowed = _allowed(cfg, cache_index + jnp.arange(t), s, seen)
    q = q.reshape(b, t, hk, hq // hk, hd)
    if cache_kv is None:
        out = _attend(q, k, v, allowed)
    elif t == 1:
        out = _attend_one(q[:, 0], *new_cache, allowed[:, 0]).astype(v.dtype)
    else:
        ck, cv = new_cache
        scores = jnp.einsum("btkgd,bkds->bkgts", q, ck, preferred_element_type=jnp.float32)
        probs = _probs(scores, allowed, hd, cv.dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, cv, preferred_element_type=jnp.float32).astype(v.dtype)
    out = out.reshape(b, t, hq * hd)
    return _dense(p["o"], out), new_cache


def _attend_at(cfg: ModelConfig, p: Params, x: jax.Array, where: Placement, k: jax.Array, v: jax.Array,
               query_at: jax.Array) -> jax.Array:
    """`_attention` (no cache) of only the queries at flat token indices ``query_at`` ``[N]`` (row *
    T + slot) over every key of their row: ``[N, 1, D]``, each query a row of one token. The keys
    ``k`` / ``v`` ``[B, T, Hk, hd]`` are this layer's at every token (before RoPE)."""
    positions, key_mask, _ = where
    b, t, _ = x.shape
    hq, hk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    row, col = query_at // t, query_at % t
    q = _dense(p["q"], x.reshape(b * t, -1)[query_at]).reshape(-1, 1, hq, hd)
    if not cfg.learned_positions:
        q, k = _rope(cfg, q, positions[row, col][:, None]), _rope(cfg, k, positions)
    seen = key_mask[row, col] if key_mask.ndim == 3 else key_mask[row]  # [N, T]
    allowed = _allowed(cfg, col[:, None], t, seen[:, None])  # [N, 1, T]
    out = _attend(q.reshape(-1, 1, hk, hq // hk, hd), k[row], v[row], allowed)
    return _dense(p["o"], out.reshape(-1, 1, hq * hd))


def _allowed(cfg: ModelConfig, q_slot: jax.Array, s: int, seen: jax.Array) -> jax.Array:
    """Which of `s` key slots each query may see, ``[B, T, S]``: `seen` (``[B, T or 1, S]``) within
    causality (no key after the query's slot `q_slot`, ``[T]`` or ``[B, T]``) and the sliding window
    -- one rule for a prompt, a call against the cache and `_attend_at`'s gathered queries."""
    k_slot = jnp.arange(s)
    allowed = (k_slot <= q_slot[..., None]) & seen.astype(bool)
    if cfg.sliding_window is not None:
        allowed &= k_slot > q_slot[..., None] - cfg.sliding_window
    return allowed


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Queries ``[B, T, Hk, G, hd]`` over keys / values ``[B, S, Hk, hd]`` (a call's own, no cache;
    `allowed` ``[B, T, S]``) -> ``[B, T, Hk, G, hd]`` in the values' dtype, float32 sums."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = _probs(scores, allowed, q.shape[-1], v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _probs(scores: jax.Array, allowed: jax.Array, hd: int, dtype: Any) -> jax.Array:
    """Attention weights from the float32 ``[B, Hk, G, T, S]`` dot products of queries and keys of
    `hd` dims: scaled by 1/sqrt(hd), the keys outside ``allowed`` ``[B, T, S]`` left out, softmax."""
    scores = jnp.where(allowed[:, None, None], scores / np.sqrt(hd), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Attention of one new token per row (a decode step): q ``[B, Hk, G, hd]`` over the cache's
    keys ``[B, Hk, hd, S]`` and values ``[B, Hk, S, hd]`` (``allowed`` ``[B, S]``) -> ``[B, Hk, G, hd]``
    float32.

    Written as broadcast products reduced over hd, then over S -- not the einsums of a prompt: for
    one query row XLA's CPU dot turns those into a transposed copy of the whole cache per layer and
    step, where a fused multiply-reduce reads the cache once; in the cache's layout (`KVCache`) both
    reductions run along a major axis, vectorised over the minor one. The sums are float32 whatever
    the cache dtype, as the einsums' are."""
    f32 = jnp.float32
    scores = (q[..., None].astype(f32) * k[:, :, None].astype(f32)).sum(3) / np.sqrt(q.shape[-1])  # [B,Hk,G,S]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return (probs[..., None].astype(f32) * v[:, :, None].astype(f32)).sum(3)


def _add_at(x: jax.Array, index: jax.Array, vector: jax.Array) -> jax.Array:
    """x[b, index[b]] += vector[b], as a dense masked add so it differentiates cleanly."""
    onehot = jax.nn.one_hot(index, x.shape[1], dtype=x.dtype)  # [B, T]
    return x + onehot[:, :, None] * vector[:, None, :].astype(x.dtype)


def _layer(
    *,
    cfg: ModelConfig,
    p: Params,
    x: jax.Array,
    where: Placement,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    layer: int,
    reads: tuple[Site, ...],
    adds: Mapping[Site, tuple[jax.Array, jax.Array]],
    prompt_len: jax.Array | None = None,
    route: dict | None = None,
    mlp_stack: EditStack | None = None,
    query_at: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, dict[Site, jax.Array], dict]:
    """One decoder layer ``p`` (index ``layer``) on the hidden state ``x`` ``[B, T, D]``.

    Returns the hidden state leaving the layer, this layer's updated ``(k, v)`` cache (None without
    a cache) and the reads of this layer, ``{(site, layer): [B, T, X]}``: returned, not written into
    a caller's dict, so that a layer is a function of its arguments and nothing else -- and the
    decisions of its MLP adapters, if any (``route``: those of an earlier call, for decode steps).
    ``query_at`` ``[N]`` (no cache, no hooks): only the tokens at these flat indices leave the layer,
    ``[N, 1, D]`` (`forward`'s ``last_at``).
    """
    captured: dict[Site, jax.Array] = {}

    def hook(site: str, value: jax.Array) -> jax.Array:
        if (site, layer) in adds:
            value = _add_at(value, *adds[(site, layer)])
        if (site, layer) in reads:
            captured[(site, layer)] = value
        return value

    x = hook("layer_in", x)
    h = _norm(cfg, p["attn_norm"], x)
    attn, new_kv = _attention(cfg, p["attn"], h, where, cache_kv, query_at)
    if query_at is not None:  # the rest of the layer at those tokens only
        x, h = (y.reshape(-1, y.shape[-1])[query_at][:, None] for y in (x, h))
        where = where._replace(positions=where.positions.reshape(-1)[query_at][:, None])
    mlp_in = hook("mlp_in", h if cfg.parallel_residual else _norm(cfg, p["mlp_norm"], x + attn))
    if mlp_stack is None:
        mlp_out, new_route = _mlp(cfg, p["mlp"], mlp_in, where.positions, prompt_len, route, hook)
    else:  # an edit stack's members differ in this MLP only: it alone runs per member
        rows = {"x": mlp_in, "positions": where.positions, "prompt_len": prompt_len, "route": route}
        mlp_out, new_route = per_member(lambda m, **kw: _mlp(cfg, m, hook=hook, **kw), mlp_stack, rows)
    mlp_out = hook("mlp_out", mlp_out)
    out = x + attn + mlp_out
    return hook("residual", out), new_kv, captured, new_route


def _mlp(cfg: ModelConfig, m: Params, x: jax.Array, positions: jax.Array, prompt_len: jax.Array | None,
         route: dict | None, hook: Callable[[str, jax.Array], jax.Array]) -> tuple[jax.Array, dict]:
    """A layer's MLP (and its adapters, if any) on its input ``x``: the output and the adapters' routes."""
    if cfg.gated_mlp:
        key = _act(cfg, _dense(m["gate"], x)) * _dense(m["up"], x)
    else:
        key = _act(cfg, _dense(m["up"], x))
    key = hook("mlp_key", key)
    out = _dense(m["down"], key)
    new_route: dict = {}
    if mlp_adapters(m):
        out, new_route = apply_mlp_adapters(m, key, out, positions, prompt_len, route)
    return out, new_route


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    if cfg.learned_positions:
        x = x + jnp.take(params["pos_embed"]["embedding"], positions, axis=0)
    return x


def unembed(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm + LM head -> float32 logits (per member for an `EditStack`)."""
    if isinstance(params, EditStack):
        if mlp_stacks(params) is not None:  # the members share everything unembed reads
            return unembed(params.base, cfg, hidden)
        return per_member(lambda p, hidden: unembed(p, cfg, hidden), params, {"hidden": hidden})
    h = _norm(cfg, params["final_norm"], hidden)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h, params["embed"]["embedding"], preferred_element_type=jnp.float32)
    else:
        logits = _dense(params["lm_head"], h, jnp.float32)
    return logits


def top_token(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last (vocabulary) axis as int32: the index of the first largest logit.

    Why not `jnp.argmax`: XLA's CPU backend runs its (value, index) reduction one element at a time
    -- 14 ms for 128 rows of the default model's 49,152 logits, ~5% of a decode step -- where a
    plain max vectorises. So: the max of each block of ~1k logits, the first block that holds the
    row's max, the argmax inside it (~1 ms). The same index as `jnp.argmax` for logits without NaN."""
    v = logits.shape[-1]
    c = _vocab_block(v)
    if c is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    blocks = logits.reshape(logits.shape[:-1] + (v // c, c))
    which = jnp.argmax(blocks.max(-1), axis=-1)
    inside = jnp.take_along_axis(blocks, which[..., None, None], axis=-2)[..., 0, :]
    return (which * c + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _vocab_block(v: int) -> int | None:
    """The divisor of a vocabulary size `v` in [256, 4096] nearest 1024 (`top_token`), None if none."""
    return next((c for c in sorted(range(256, 4097), key=lambda c: abs(c - 1024)) if v % c == 0), None)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array | None,
    *,
    attn_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    reads: tuple[Site, ...] = (),
    adds: Mapping[Site, tuple[jax.Array, jax.Array]] | None = None,
    start_layer: int = 0,
    hidden: jax.Array | None = None,
    stop_layer: int | None = None,
    return_logits: bool = True,
    prompt_len: jax.Array | None = None,
    routes: Mapping[int, dict] | None = None,
    last_at: jax.Array | None = None,
) -> ForwardOutput:
    """Run the decoder.

    tokens: ``[B, T]`` int ids (ignored when ``hidden`` is given).
    attn_mask: which key slots hold real tokens: ``[B, T]`` without a cache, ``[B, S]`` (the
      whole cache) with one. Defaults to all ones. Or ``[B, T, T]`` (``[B, T, S]`` with a cache):
      which keys each query sees besides causality (sequences packed into one row, `positions`
      then given).
    positions: ``[B, T]`` RoPE / position-table indices; defaults to ``positions_from_mask``.
    cache / cache_index: KV cache and the slot where this call's first token is written.
    start_layer / hidden: run layers ``start_layer..`` from ``hidden`` (the ``layer_in`` of
      ``start_layer``). stop_layer: stop after that many layers (exclusive bound), e.g. to
      collect keys without paying for the rest of the stack; logits are then not computed.
    prompt_len: ``[B]`` real prompt tokens per row, for adapters (the last prompt token has position
      ``prompt_len - 1``); None: every token of this call is prompt. Ignored without adapters.
    routes: the ``ForwardOutput.routes`` of the prefill of the same rows (decode steps): the
      adapters' per-row decisions made at the last prompt token, which a decode step does not see.
    last_at: ``[N]`` flat token indices (row * T + slot; no cache, plain params): the last layer runs
      its queries, MLP and residual at these tokens only (its keys / values at all) and the hidden
      state / logits are theirs, ``[N, 1, ...]``. Why: a loss that reads a few tokens (FT's targets:
      ~100 of 448 packed slots) needs nothing else from the top layer -- ~6% of FT-M's step.

    params may be an `EditStack` of K edited models: the rows are then K equal member-major blocks,
    block k run on member k (`stack.per_member`).
    """
    top = (cfg.num_layers if stop_layer is None else stop_layer) - 1
    if last_at is not None and (cache is not None or isinstance(params, EditStack) or prompt_len is not None
                                or any(layer == top for _, layer in (*reads, *(adds or {})))):
        raise ValueError("last_at: only without a cache, an edit stack, adapters' prompt_len or hooks on the top layer")
    mlp_stack = {}
    if isinstance(params, EditStack) and not reads and not adds:
        mlp_stack = mlp_stacks(params) or {}
        params = params.base if mlp_stack else params
    if isinstance(params, EditStack):  # leaves outside the MLPs, or hooks: the whole forward per member
        batched = {"tokens": tokens, "attn_mask": attn_mask, "positions": positions, "cache": cache, "adds": adds,
                   "hidden": hidden, "prompt_len": prompt_len, "routes": routes}
        return per_member(lambda p, **kw: forward(p, cfg, **kw), params, batched, cache_index=cache_index,
                          reads=reads, start_layer=start_layer, stop_layer=stop_layer, return_logits=return_logits)
    adds = dict(adds or {})
    for site, layer in tuple(reads) + tuple(adds):
        if site not in SITES or not 0 <= layer < cfg.num_layers:
            raise ValueError(f"hook ({site!r}, {layer}) invalid: sites {SITES}, layers 0..{cfg.num_layers - 1}")
    ref = hidden if hidden is not None else tokens
    b, t = ref.shape[0], ref.shape[1]
    if attn_mask is None:
        attn_mask = jnp.ones((b, t if cache is None else cache.slots), jnp.int32)
    if positions is None:
        if attn_mask.ndim != 2:
            raise ValueError("a [B, T, T] attention mask needs explicit positions")
        positions = positions_from_mask(attn_mask[:, :t])  # prompt / prefill: slots 0..t-1
    x = hidden if hidden is not None else embed(params, cfg, tokens, positions)
    stop = top + 1
    out_reads: dict[Site, jax.Array] = {}
    out_routes: dict[int, dict] = {}
    new_k, new_v = (list(cache.k), list(cache.v)) if cache is not None else (None, None)
    where = Placement(positions, attn_mask, cache_index)
    for layer in range(start_layer, stop):
        kv = (cache.k[layer], cache.v[layer]) if cache is not None else None
        x, new_kv, layer_reads, route = _layer(cfg=cfg, p=params["layers"][layer], x=x, where=where, cache_kv=kv,
                                               layer=layer, reads=reads, adds=adds, prompt_len=prompt_len,
                                               route=None if routes is None else routes.get(layer),
                                               mlp_stack=mlp_stack.get(layer),
                                               query_at=last_at if layer == top else None)
        out_reads.update(layer_reads)
        if route:
            out_routes[layer] = route
        if new_kv is not None:
            new_k[layer], new_v[layer] = new_kv
    if last_at is not None and start_layer >= stop:  # no layer ran: the tokens as they came
        x = x.reshape(-1, x.shape[-1])[last_at][:, None]
    logits = unembed(params, cfg, x) if return_logits and stop == cfg.num_layers else None
    new_cache = KVCache(new_k, new_v) if cache is not None else None
    return ForwardOutput(logits, out_reads, new_cache, x, out_routes)
