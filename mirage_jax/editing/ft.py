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
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mirage_jax.editing.common import Reads, check_layers, down_kernel, loss_reads, read_nll, replace_down_kernels
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch


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
    """Mean NLL of the read target tokens, `mean_per_request` (both objectives: only `reads` differ)."""
    p = replace_down_kernels(params, trainable)
    h = forward(p, cfg, None, attn_mask=attn_mask, start_layer=start, hidden=hidden, return_logits=False).hidden
    return read_nll(p, cfg, h, reads)


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _optimise(params, cfg: ModelConfig, hp: FTConfig, tokens, attn_mask, reads: Reads):
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


def ft_edit(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
            hp: FTConfig) -> tuple[Any, dict]:
    """Fine-tune on (prompt, target) pairs -> (new params, info). The input pytree is untouched."""
    check_layers(hp.layers, cfg.num_layers, "FT")
    if hp.objective not in ("target_new", "prompt_last"):
        raise ValueError(f"FT: objective must be 'target_new' or 'prompt_last', got {hp.objective!r}")
    b = make_batch(tokenizer, prompts, targets)
    reads = loss_reads(b.tokens, b.target_mask, b.prompt_last, hp.objective)
    w, steps, loss = _optimise(params, cfg, hp, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask), reads)
    return replace_down_kernels(params, w), {"steps": int(steps), "loss": float(loss)}
