"""The value optimisation shared by ROME, R-ROME and MEMIT (spec 4.2 step 4, 4.4 step 3).

For each request i find δ_i ∈ R^d such that adding δ_i to the hidden state at layer ℓ, at the
subject's last token, makes the model produce the new target:

    L_i(δ_i) = 1/|P_i| Σ_{p ∈ P_i} −(1/|y|) Σ_t log P(y_t | p ⊕ y_<t ; h_ℓ += δ_i)     (NLL)
             + kl_factor · KL( P(· | "{s_i} is a" ; δ_i) ‖ P(· | "{s_i} is a" ; 0) )   (essence)
             + v_weight_decay · ‖δ_i‖ / ‖v_init,i‖²                                   (decay)

P_i = the request's prompt inside each context template; the KL distribution is the next-token
distribution at the subject's last token of the KL prompt. The decay term is the seed's exact
form, ``‖δ‖ / ‖v_init‖²`` (norm, not squared norm: ROME's `compute_v`). Adam(v_lr) for at most
v_num_grad_steps loss evaluations; the last evaluation and any with L_i < 5e-2 take no step;
after each step δ_i is projected onto the ball ‖δ_i‖ ≤ clamp_norm_factor · ‖v_init,i‖.

v_init is the activation at the edited site for the plain ("{}") prompt at the first pass: the
MLP output of layer ℓ for ROME (``site='mlp_out'``), the residual leaving layer ℓ for MEMIT
(``site='residual'``). Either way δ enters the network as an addition to the residual stream
leaving layer ℓ (out = x + attn + mlp_out), so layers ≤ ℓ run once, outside the loop, and each
step runs layers ℓ+1.. only.

All requests of a batch and all their templates are one padded batch; the optimisation of every
δ_i is one jitted ``lax.while_loop``. Requests are independent: the total loss is Σ_i L_i (so
δ_i's gradient is that of L_i alone) and a request that reached its stop rule is frozen, exactly
as if it had been optimised on its own.
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

from mirage_jax.editing.locate import SubjectBatch, SubjectRow, locate_batch
from mirage_jax.editing.templates import template_prefix
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward, positions_from_mask, unembed
from mirage_jax.tokens import bucket

V_SITES = ("mlp_out", "residual")


class ValueSettings(NamedTuple):
    """Static settings of one compiled optimisation (hashable: a `jax.jit` static argument)."""

    layer: int  # ℓ: δ is added to the hidden state leaving this layer
    site: str  # what v_init is: 'mlp_out' (ROME) or 'residual' (MEMIT)
    num_steps: int  # v_num_grad_steps: loss evaluations at most (one fewer Adam steps)
    lr: float  # v_lr
    weight_decay: float  # v_weight_decay
    clamp_norm_factor: float  # radius of the δ ball in units of ‖v_init‖
    kl_factor: float  # weight of the KL term
    stop_loss: float  # a request whose loss is below this stops (seed: 5e-2)

    @classmethod
    def from_hparams(cls, hp: Any, layer: int, site: str) -> ValueSettings:
        if site not in V_SITES:
            raise ValueError(f"value site must be one of {V_SITES}, got {site!r}")
        return cls(int(layer), site, int(hp.v_num_grad_steps), float(hp.v_lr), float(hp.v_weight_decay),
                   float(hp.clamp_norm_factor), float(hp.kl_factor), float(getattr(hp, "early_stop_loss", 5e-2)))


@dataclasses.dataclass(frozen=True)
class ValueProblem:
    """Host-side arrays of one value optimisation (all static-shaped)."""

    batch: SubjectBatch  # rows: each request x each template, then one KL row per request
    row_request: np.ndarray  # [B] int32 request of each row (0 on filler rows)
    is_nll: np.ndarray  # [B] bool: a templated prompt + target row
    is_kl: np.ndarray  # [B] bool: the request's "{subject} is a" row
    init_row: np.ndarray  # [N] int32 the request's plain-prompt row (where v_init is read)
    pred_pos: np.ndarray  # [B, K] int32 positions whose logits predict a target token
    labels: np.ndarray  # [B, K] int32 the target token they predict
    label_mask: np.ndarray  # [B, K] float32


class ValueResult(NamedTuple):
    delta: np.ndarray  # [N, d] δ per request
    v_init: np.ndarray  # [N, d]
    loss: np.ndarray  # [N] final loss per request (at the returned δ)
    nll: np.ndarray  # [N]
    kl: np.ndarray  # [N]
    steps: np.ndarray  # [N] Adam steps taken per request
    evaluations: int  # loss evaluations of the whole batch


def kl_prompt(subject: str) -> str:
    return f"{subject.strip()} is a"


def build_problem(tokenizer: Any, prompts: Sequence[str], subjects: Sequence[str], targets: Sequence[str],
                  templates: Sequence[str]) -> ValueProblem:
    """Rows ``template(prompt) + " " + target`` for every request and template (the first
    template must be the plain "{}"), then each request's KL prompt."""
    if not templates or templates[0] != "{}":
        raise ValueError("the first context template must be the plain '{}'")
    prefixes = [template_prefix(t) for t in templates]
    n, m = len(prompts), len(prefixes)
    rows = [SubjectRow(pre, p, s, t) for p, s, t in zip(prompts, subjects, targets) for pre in prefixes]
    rows += [SubjectRow("", kl_prompt(s), s, None) for s in subjects]
    batch = locate_batch(tokenizer, rows)
    b = batch.tokens.shape[0]
    row_request = np.zeros((b,), np.int32)
    row_request[: n * m] = np.repeat(np.arange(n), m)
    row_request[n * m : n * m + n] = np.arange(n)
    is_nll = np.zeros((b,), bool)
    is_nll[: n * m] = True
    is_kl = np.zeros((b,), bool)
    is_kl[n * m : n * m + n] = True
    k = bucket(int(batch.target_mask.sum(-1).max()), 4)
    pred_pos = np.zeros((b, k), np.int32)
    labels = np.zeros((b, k), np.int32)
    label_mask = np.zeros((b, k), np.float32)
    for r in range(n * m):
        pos = np.nonzero(batch.target_mask[r])[0]
        pred_pos[r, : len(pos)] = pos - 1  # the logits at t-1 predict token t
        labels[r, : len(pos)] = batch.tokens[r, pos]
        label_mask[r, : len(pos)] = 1
    return ValueProblem(batch, row_request, is_nll, is_kl, np.arange(n, dtype=np.int32) * m, pred_pos, labels,
                        label_mask)


def _safe_norm(x: jax.Array) -> jax.Array:
    """‖x‖ over the last axis with gradient 0 (not NaN) at x = 0, like torch.norm."""
    sq = jnp.sum(x * x, axis=-1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "vs"))
def _optimise(params, cfg: ModelConfig, vs: ValueSettings, tokens, attn_mask, subject_last, row_request, is_nll,
              is_kl, init_row, pred_pos, labels, label_mask):
    n = init_row.shape[0]
    layer = vs.layer
    first = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=layer + 1, reads=((vs.site, layer),))
    hidden = jax.lax.stop_gradient(first.hidden)  # residual leaving layer ℓ, [B, T, D]
    site = first.reads[(vs.site, layer)]
    v_init = site[init_row, subject_last[init_row]].astype(jnp.float32)  # [N, D]
    positions = positions_from_mask(attn_mask)
    at_subject = jax.nn.one_hot(subject_last, tokens.shape[1], dtype=hidden.dtype)[:, :, None]  # [B, T, 1]
    read_pos = jnp.concatenate([pred_pos, subject_last[:, None]], axis=1)  # [B, K + 1]
    seg = jax.nn.one_hot(row_request, n, dtype=jnp.float32)  # [B, N]
    nll_seg, kl_seg = seg * is_nll[:, None], seg * is_kl[:, None]

    def log_probs(delta):
        x = hidden + at_subject * delta[row_request][:, None, :].astype(hidden.dtype)
        out = forward(params, cfg, None, attn_mask=attn_mask, positions=positions, start_layer=layer + 1,
                      hidden=x, return_logits=False).hidden
        picked = jnp.take_along_axis(out, read_pos[:, :, None], axis=1)  # only the logits we need
        return jax.nn.log_softmax(unembed(params, cfg, picked), axis=-1)  # [B, K + 1, V]

    kl_init = log_probs(jnp.zeros_like(v_init))[:, -1]
    v_norm = jnp.linalg.norm(v_init, axis=-1)

    def losses(delta):
        lp = log_probs(delta)
        tok_lp = jnp.take_along_axis(lp[:, :-1], labels[:, :, None], axis=-1)[..., 0]
        nll_row = -(tok_lp * label_mask).sum(-1) / jnp.maximum(label_mask.sum(-1), 1.0)
        nll = (nll_seg * nll_row[:, None]).sum(0) / jnp.maximum(nll_seg.sum(0), 1.0)
        cur = lp[:, -1]
        kl_row = jnp.sum(jnp.exp(cur) * (cur - kl_init), axis=-1)  # KL(current ‖ initial)
        kl = (kl_seg * kl_row[:, None]).sum(0)
        decay = vs.weight_decay * _safe_norm(delta) / v_norm**2
        per = nll + vs.kl_factor * kl + decay
        return per.sum(), (per, nll, kl)

    opt = optax.adam(vs.lr)
    grad_fn = jax.value_and_grad(losses, has_aux=True)
    max_norm = vs.clamp_norm_factor * v_norm

    def body(c):
        delta, state, i, done, steps, _ = c
        (_, aux), g = grad_fn(delta)
        done = done | (aux[0] < vs.stop_loss) | (i == vs.num_steps - 1)
        upd, new_state = opt.update(g, state, delta)
        new = delta + upd
        norm = _safe_norm(new)
        new = new * jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)[:, None]
        delta = jnp.where(done[:, None], delta, new)  # a finished request is frozen
        return delta, new_state, i + 1, done, steps + (~done).astype(jnp.int32), aux

    def cond(c):
        return (c[2] < vs.num_steps) & ~jnp.all(c[3])

    zeros = jnp.zeros_like(v_init)
    aux0 = (jnp.full((n,), jnp.inf), jnp.full((n,), jnp.inf), jnp.zeros((n,)))
    init = (zeros, opt.init(zeros), jnp.int32(0), jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32), aux0)
    delta, _, evals, _, steps, (loss, nll, kl) = jax.lax.while_loop(cond, body, init)
    return delta, v_init, loss, nll, kl, steps, evals


def value_optimisation(
    params: Any,
    cfg: ModelConfig,
    problem: ValueProblem,
    settings: ValueSettings,
) -> ValueResult:
    """Optimise one δ per request of `problem` (see the module docstring)."""
    if settings.num_steps < 1:
        raise ValueError("v_num_grad_steps must be >= 1")
    b = problem.batch
    out = _optimise(params, cfg, settings, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                    jnp.asarray(b.subject_last), jnp.asarray(problem.row_request), jnp.asarray(problem.is_nll),
                    jnp.asarray(problem.is_kl), jnp.asarray(problem.init_row), jnp.asarray(problem.pred_pos),
                    jnp.asarray(problem.labels), jnp.asarray(problem.label_mask))
    delta, v_init, loss, nll, kl, steps, evals = jax.device_get(out)
    return ValueResult(np.asarray(delta), np.asarray(v_init), np.asarray(loss), np.asarray(nll), np.asarray(kl),
                       np.asarray(steps), int(evals))
