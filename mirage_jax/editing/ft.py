"""FT-L / FT-M: constrained fine-tuning of chosen MLP down projections (spec 4.1).

FT-M (the paper's variant) minimises the teacher-forced NLL of the target tokens given the
prompt; FT-L maximises the mean log-probability of all target tokens under the next-token
distribution at the last prompt token (ROME paper's bag-of-tokens baseline).

The whole optimisation is one jitted `lax.while_loop`: gradients flow only into the trained
kernels, the hidden state entering the lowest trained layer is computed once (layers below it
never change), an L-inf box around the original weights is optional, and the loop stops as soon
as the loss is below `early_stop_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirage_jax.editing.common import (
    Reads,
    check_layers,
    down_kernel,
    loss_reads,
    mean_per_request,
    replace_down_kernels,
    token_nll_at,
)
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.stack import nbytes
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import bucket, first_fit, ladder, make_batch


@dataclasses.dataclass(frozen=True)
class FTConfig:
    layers: tuple[int, ...] = (21,)  # layers whose MLP down projection is trained (paper: 21 of 32)
    objective: str = "target_new"  # 'target_new' (FT-M) or 'prompt_last' (FT-L)
    num_steps: int = 25  # maximum optimisation steps
    lr: float = 5e-4  # Adam learning rate
    weight_decay: float = 0.0  # L2 on the trained kernels (torch-Adam style, coupled)
    norm_constraint: float | None = None  # L-inf radius around the original weights; None = off
    early_stop_loss: float = 1e-2  # stop once the loss is below this (no step is taken then)
    batch_size: int = 1  # requests per edit in batch mode


def _loss(trainable, params, cfg: ModelConfig, start: int, hidden, attn_mask, reads: Reads):
    """Mean NLL of the read target tokens, `mean_per_request` (both objectives: only `reads` differ);
    the top layer runs at the read tokens only (`forward`'s ``last_at``)."""
    p = replace_down_kernels(params, trainable)
    b, t = hidden.shape[:2]
    at = (jnp.arange(b)[:, None] * t + reads.pos).reshape(-1)
    h = forward(p, cfg, None, attn_mask=attn_mask, start_layer=start, hidden=hidden, return_logits=False,
                last_at=at).hidden
    return mean_per_request(token_nll_at(p, cfg, h.reshape(b, -1, h.shape[-1]), reads.tok), reads.mask)


def _optimise_impl(params, cfg: ModelConfig, hp: FTConfig, tokens, attn_mask, reads: Reads):
    start = min(hp.layers)
    hidden = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=start).hidden
    hidden = jax.lax.stop_gradient(hidden)
    w0 = {l: down_kernel(params, l).astype(jnp.float32) for l in hp.layers}
    opt = optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.adam(hp.lr))
    loss_grad = jax.value_and_grad(_loss)

    def step(carry):
        w, state, i, _, _ = carry
        loss, g = loss_grad(w, params, cfg, start, hidden, attn_mask, reads)
        stop = loss < hp.early_stop_loss
        upd, new_state = opt.update(g, state, w)
        new_w = optax.apply_updates(w, upd)
        if hp.norm_constraint is not None:
            eps = hp.norm_constraint
            new_w = {l: jnp.clip(new_w[l], w0[l] - eps, w0[l] + eps) for l in new_w}
        keep = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(stop, x, y), a, b)  # noqa: E731
        return keep(w, new_w), keep(state, new_state), i + 1, loss, stop

    def cond(carry):
        return (carry[2] < hp.num_steps) & ~carry[4]

    init = (w0, opt.init(w0), jnp.int32(0), jnp.float32(jnp.inf), jnp.bool_(False))
    w, _, steps, last_loss, _ = jax.lax.while_loop(cond, step, init)
    return w, steps, last_loss


_optimise = jax.jit(_optimise_impl, static_argnames=("cfg", "hp"))


def _check(cfg: ModelConfig, hp: FTConfig) -> None:
    check_layers(hp.layers, cfg.num_layers, "FT")
    if hp.objective not in ("target_new", "prompt_last"):
        raise ValueError(f"FT: objective must be 'target_new' or 'prompt_last', got {hp.objective!r}")


def ft_edit(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
            hp: FTConfig) -> tuple[Any, dict]:
    """Fine-tune on (prompt, target) pairs -> (new params, info). The input pytree is untouched."""
    _check(cfg, hp)
    b = make_batch(tokenizer, prompts, targets)
    reads = loss_reads(b.tokens, b.target_mask, b.prompt_last, hp.objective)
    w, steps, loss = _optimise(params, cfg, hp, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask), reads)
    return replace_down_kernels(params, w), {"steps": int(steps), "loss": float(loss)}


class _Packing(NamedTuple):
    """Single-edit requests packed into rows (`_pack`): request r's tokens are a segment of one row."""

    tokens: np.ndarray  # [R, W] the packed token ids
    segments: np.ndarray  # [R, W] the request each slot holds, -1 for an empty slot
    positions: np.ndarray  # [R, W] each token's position within its own request
    flat: np.ndarray  # [n, T] where the token in column t of request r's left-padded row sits (row * W + slot)
    valid: np.ndarray  # [n, T] 1 where that column holds a token


def _pack(tokens: np.ndarray, attn: np.ndarray) -> _Packing:
    """Pack the left-padded rows of a `make_batch` batch into rows of W = bucket(longest, 64) slots,
    first fit by decreasing length; the row count on quarter octaves (`tokens.ladder`: every count up
    to 8, then 10, 12, 14, 16, 20, ...; empty rows fill it).

    Why not powers of two: the optimisation is compute-bound on the packed slots, and QAEdit's groups
    of 16 requests (351-487 tokens) use 6-8 rows of 64: padded to 8 rows, the 7-row groups ran 14.7 s
    where 7 rows take 13.0 (25 steps, default model); a row count costs one more compiled loop (~3 s)."""
    n, t = tokens.shape
    lengths = attn.sum(-1)
    width = bucket(int(lengths.max()), 64)
    place, used = first_fit([int(x) for x in lengths], width)
    rows = ladder(used, 4)
    packed, segments = np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32)
    positions = np.zeros((rows, width), np.int32)
    flat, valid = np.zeros((n, t), np.int32), attn.astype(np.float32)
    for r in range(n):
        (row, slot), length = place[r], lengths[r]
        packed[row, slot : slot + length] = tokens[r, t - length :]
        segments[row, slot : slot + length] = r
        positions[row, slot : slot + length] = np.arange(length)
        flat[r, t - length :] = row * width + slot + np.arange(length)
    return _Packing(packed, segments, positions, flat, valid)


class _FlatReads(NamedTuple):
    """The loss reads of packed requests as one list (`_flat_reads`): what goes through the LM head."""

    slot: np.ndarray  # [N] the packed slot (row * W + slot) whose next-token distribution scores a target token
    tok: np.ndarray  # [N] that token
    owner: np.ndarray  # [N] the request it belongs to
    valid: np.ndarray  # [N] 1.0 for a read, 0.0 for the filler after the last


READ_ROWS = 16  # the LM head sees the flat reads as [READ_ROWS, N / READ_ROWS] (see `_flat_reads`)


def _flat_reads(reads: Reads, pk: _Packing) -> _FlatReads:
    """`reads` (``[n, K]`` per request, K a quarter of the row bucket) as one list of the real reads,
    request-major, mapped into the packing: N = a quarter of its slots, more only where the reads
    need it (a power of two), so the shape follows the packing's and adds no compiled loop of its own.

    Why: the LM head (49k x 576 on the default model) ran forward and backward at all n x K read
    slots, where QAEdit's 16 requests hold ~66 targets in 256 slots: a step of 16 packed requests
    0.70-0.75 -> 0.56-0.61 s, the kernels bit-identical (each read's NLL is the same arithmetic, its
    request's sum a segment sum). The reads go through the head as [16, N / 16] rows: as one [1, N]
    row the same step took 0.72-0.79 s (XLA's CPU dot), and the kernels differed in the last bits."""
    pos, tok, mask = (np.asarray(x) for x in reads)
    req, k = np.nonzero(mask)
    n = max(bucket(len(req), READ_ROWS), pk.tokens.size // 4)
    out = _FlatReads(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32))
    out.slot[: len(req)], out.tok[: len(req)] = pk.flat[req, pos[req, k]], tok[req, k]
    out.owner[: len(req)], out.valid[: len(req)] = req, 1.0
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _optimise_packed(params, cfg: ModelConfig, hp: FTConfig, pk: _Packing, reads: _FlatReads):
    """`_optimise` of n requests at once, each on its own kernel ``[n, F, D]`` and its own loss,
    their sequences packed into shared rows (segment-masked attention, positions per request).

    Why packed and not vmapped: the shared layers then see only real tokens, where one request alone
    is a ~16-row matmul per weight (streamed from memory for little arithmetic) and a vmap pads every
    request to the longest of the group (QAEdit: 25 tokens on average, groups of 16 padded to 64).
    Only the trained layer's kernel differs between requests, and its input (the MLP key) does not
    depend on it: so the layer runs once on the original kernel, and each step adds each request's
    ``key @ (W_r - W_0)`` on its own tokens. Per request, Adam's update, the box and the early stop are
    those of `_optimise` on that request alone (elementwise, and a request's count of updates is the
    loop's step while it runs); a request that stopped keeps its kernel while the others go on."""
    (layer,) = hp.layers
    rows, width = pk.tokens.shape
    n = pk.flat.shape[0]
    mask = pk.segments[:, :, None] == pk.segments[:, None, :]
    first = forward(params, cfg, pk.tokens, attn_mask=mask, positions=pk.positions, stop_layer=layer + 1,
                    reads=(("mlp_key", layer),))
    flat = lambda x: x.reshape(rows * width, x.shape[-1])  # noqa: E731
    base = jax.lax.stop_gradient(flat(first.hidden))  # leaving the trained layer with the original kernel
    keys = jax.lax.stop_gradient(jnp.take(flat(first.reads[("mlp_key", layer)]), pk.flat, axis=0))  # [n, T, F]
    keys = keys * pk.valid[..., None]
    kernel = down_kernel(params, layer)
    w0 = jnp.broadcast_to(kernel.astype(jnp.float32), (n,) + kernel.shape)
    count = jax.ops.segment_sum(reads.valid, reads.owner, num_segments=n)  # reads per request

    def losses(w):
        delta = jnp.einsum("ntf,nfd->ntd", keys, w - w0, preferred_element_type=jnp.float32)
        h = base.at[pk.flat].add((delta * pk.valid[..., None]).astype(base.dtype)).reshape(rows, width, -1)
        h = forward(params, cfg, None, attn_mask=mask, positions=pk.positions, start_layer=layer + 1, hidden=h,
                    return_logits=False, last_at=reads.slot).hidden  # the read slots' only: [N, 1, D]
        at = h.reshape(READ_ROWS, -1, h.shape[-1])
        nll = token_nll_at(params, cfg, at, reads.tok.reshape(READ_ROWS, -1)).reshape(-1)
        per = jax.ops.segment_sum(nll * reads.valid, reads.owner, num_segments=n) / jnp.maximum(count, 1)
        return per.sum(), per  # requests are independent: d(sum)/d(W_r) is request r's own gradient

    opt = optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.adam(hp.lr))
    loss_grad = jax.value_and_grad(losses, has_aux=True)

    def step(carry):
        w, state, i, last, stopped, steps = carry
        (_, loss), g = loss_grad(w)
        stop = stopped | (loss < hp.early_stop_loss)
        upd, new_state = opt.update(g, state, w)
        new_w = optax.apply_updates(w, upd)
        if hp.norm_constraint is not None:
            new_w = jnp.clip(new_w, w0 - hp.norm_constraint, w0 + hp.norm_constraint)
        keep = lambda old, new: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(stop.reshape((-1,) + (1,) * (a.ndim - 1)), a, b) if a.ndim else b, old, new)
        return (keep(w, new_w), keep(state, new_state), i + 1, jnp.where(stopped, last, loss), stop,
                jnp.where(stopped, steps, i + 1))

    def cond(carry):
        return (carry[2] < hp.num_steps) & ~jnp.all(carry[4])

    init = (w0, opt.init(w0), jnp.int32(0), jnp.full((n,), jnp.inf), jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32))
    w, _, _, last, _, steps = jax.lax.while_loop(cond, step, init)
    return w, steps, last


def ft_edit_each(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                 hp: FTConfig) -> list[tuple[Any, dict]]:
    """Each (prompt, target) pair its own edit of `params` -- single editing's protocol: what
    `ft_edit` gives on that one pair -- computed together (`_optimise_packed`): one (new params,
    info) per pair. The request count is padded to a power of two with empty requests (no tokens,
    no loss), so a run's groups share a compiled loop where they pack into as many rows (`_pack`).
    With several trained layers (the trained input of the upper ones changes) the pairs are edited
    one after the other."""
    _check(cfg, hp)
    if len(hp.layers) != 1:
        return [ft_edit(params, cfg, tokenizer, [p], [t], hp) for p, t in zip(prompts, targets)]
    # Per request the loop holds its kernel, Adam's two moments and a gradient in float32: at most
    # half the model's bytes of them at once (the default model: 19 requests; a 7B one: 9).
    each = 16 * down_kernel(params, hp.layers[0]).size
    most = 1 << max(0, (max(1, nbytes(params) // 2 // each)).bit_length() - 1)
    if len(prompts) > most:
        return [e for s in range(0, len(prompts), most)
                for e in ft_edit_each(params, cfg, tokenizer, prompts[s : s + most], targets[s : s + most], hp)]
    n = len(prompts)
    b = make_batch(tokenizer, prompts, targets, batch_bucket=False)
    fill = bucket(n, 1) - n  # empty requests: no tokens (valid 0), no reads
    tokens, attn = np.pad(b.tokens, ((0, fill), (0, 0))), np.pad(b.attn_mask, ((0, fill), (0, 0)))
    reads = loss_reads(tokens, np.pad(b.target_mask, ((0, fill), (0, 0))), np.pad(b.prompt_last, (0, fill)),
                       hp.objective)
    pk = _pack(tokens, attn)
    w, steps, loss = _optimise_packed(params, cfg, hp, _Packing(*map(jnp.asarray, pk)),
                                      _FlatReads(*map(jnp.asarray, _flat_reads(reads, pk))))
    steps, loss = jax.device_get((steps, loss))
    (layer,) = hp.layers
    return [(replace_down_kernels(params, {layer: w[i]}),
             {"steps": int(steps[i]), "loss": float(loss[i])}) for i in range(n)]
