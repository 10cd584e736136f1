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

Speed (BUILD_NOTES, "Edit speed vs the PyTorch reference"): rows are left-padded, so every
row's subject-last token lies in the last S positions (S = T − min subject_last, bucketed). Attention
is causal, so the positions before those S never see δ: their keys and values at layers ℓ+1..
are computed once (a KV cache filled at δ = 0) and each step runs layers ℓ+1.. on the last S
positions only (``suffix``; ``suffix=False`` recomputes all T, the straightforward form the tests
compare it with). And only the positions that are read go through the LM head: one packed list
of (row, position) reads -- each target token of each templated row, and each request's KL
position -- instead of every row x every target slot.
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

from mirage_jax import distributed
from mirage_jax.editing.locate import SubjectBatch, SubjectRow, locate_batch
from mirage_jax.editing.templates import template_prefix
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import KVCache, forward, kv_shapes, positions_from_mask, unembed
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
    """Host-side arrays of one value optimisation (all static-shaped).

    The loss reads the next-token distribution at P (row, position) pairs, packed: every target
    token of every templated row (an NLL read, weighted so that a request's NLL is the mean over
    its templates of the mean over its target tokens) and each request's KL position; the rest
    is filler (weight 0)."""

    batch: SubjectBatch  # rows: each request x each template, then one KL row per request
    row_request: np.ndarray  # [B] int32 request of each row (0 on filler rows)
    init_row: np.ndarray  # [N] int32 the request's plain-prompt row (where v_init is read)
    read_row: np.ndarray  # [P] int32 row of each read
    read_pos: np.ndarray  # [P] int32 position whose next-token distribution is read
    read_label: np.ndarray  # [P] int32 the target token an NLL read predicts (0 otherwise)
    read_request: np.ndarray  # [P] int32 request of each read (0 on filler)
    nll_weight: np.ndarray  # [P] float32 1 / (target tokens x templates) on NLL reads, else 0
    is_kl: np.ndarray  # [P] bool the request's KL read ("{subject} is a" at the subject's last token)

    def suffix_length(self) -> int:
        """S: the last S positions hold every row's subject-last token (so everything δ can
        change), bucketed to a power of two >= 4 (few shapes) and at most T."""
        b = self.batch
        t = b.tokens.shape[1]
        return min(t, bucket(t - int(b.subject_last[: b.n_rows].min()), 4))


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
    reads: list[tuple[int, int, int, int, float, bool]] = []  # (row, pos, label, request, weight, kl)
    for r in range(n * m):
        pos = np.nonzero(batch.target_mask[r])[0]
        reads += [(r, p - 1, int(batch.tokens[r, p]), r // m, 1.0 / (len(pos) * m), False)  # logits at t-1 predict t
                  for p in pos]
    reads += [(n * m + i, int(batch.subject_last[n * m + i]), 0, i, 0.0, True) for i in range(n)]
    size = bucket(len(reads), 8)
    t = batch.tokens.shape[1]
    reads += [(n * m, t - 1, 0, 0, 0.0, False)] * (size - len(reads))  # filler: weight 0, no KL
    row, pos, label, req, weight, kl = (np.asarray(c) for c in zip(*reads))
    return ValueProblem(batch, row_request, np.arange(n, dtype=np.int32) * m, row.astype(np.int32),
                        pos.astype(np.int32), label.astype(np.int32), req.astype(np.int32),
                        weight.astype(np.float32), kl.astype(bool))


def _safe_norm(x: jax.Array) -> jax.Array:
    """‖x‖ over the last axis with gradient 0 (not NaN) at x = 0, like torch.norm."""
    sq = jnp.sum(x * x, axis=-1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "vs", "suffix"))
def _optimise(params, cfg: ModelConfig, vs: ValueSettings, suffix: int, tokens, attn_mask, subject_last, row_request,
              init_row, read_row, read_pos, read_label, read_request, nll_weight, is_kl):
    n = init_row.shape[0]
    layer = vs.layer
    t = tokens.shape[1]
    start = t - suffix  # positions < start never see δ (causal attention, δ enters at >= start)
    first = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=layer + 1, reads=((vs.site, layer),))
    hidden = jax.lax.stop_gradient(first.hidden)  # residual leaving layer ℓ, [B, T, D]
    site = first.reads[(vs.site, layer)]
    v_init = site[init_row, subject_last[init_row]].astype(jnp.float32)  # [N, D]
    positions = positions_from_mask(attn_mask)
    at_subject = jax.nn.one_hot(subject_last - start, suffix, dtype=hidden.dtype)[:, :, None]  # [B, S, 1]
    seg = jax.nn.one_hot(read_request, n, dtype=jnp.float32)  # [P, N]
    kl_seg = seg * is_kl[:, None]

    def upper(x, **kw):  # layers ℓ+1.. on x: [B, T, D], or [B, S, D] (the last S positions) with a cache
        return forward(params, cfg, None, attn_mask=attn_mask, start_layer=layer + 1, hidden=x, return_logits=False,
                       **kw)

    if suffix == t:
        prefix = None
        out0 = upper(hidden, positions=positions).hidden
    else:
        # One pass at δ = 0 fills the keys/values of layers ℓ+1.. at every position; a step
        # overwrites slots start.. with its own and reads the rest (the unchanged prefix).
        upper_layers = range(layer + 1, cfg.num_layers)
        empty = [[None] * (layer + 1) + [jnp.zeros(shape, hidden.dtype) for _ in upper_layers]
                 for shape in kv_shapes(cfg, tokens.shape[0], t)]
        zero = upper(hidden, positions=positions, cache=KVCache(*empty), cache_index=0)
        prefix = jax.tree_util.tree_map(jax.lax.stop_gradient, zero.cache)
        out0 = zero.hidden

    def log_probs(out):  # out: [B, S', D] with S' = T (full) or S (suffix) -> [P, V] at the reads
        picked = out[read_row, read_pos - (t - out.shape[1])]
        return jax.nn.log_softmax(unembed(params, cfg, picked[None])[0], axis=-1)

    def run(delta):
        x = hidden[:, start:] + at_subject * delta[row_request][:, None, :].astype(hidden.dtype)
        if prefix is None:
            return upper(x, positions=positions).hidden
        return upper(x, positions=positions[:, start:], cache=prefix, cache_index=start).hidden

    kl_init = jax.lax.stop_gradient(log_probs(out0))
    v_norm = jnp.linalg.norm(v_init, axis=-1)

    def losses(delta):
        lp = log_probs(run(delta))
        tok_lp = jnp.take_along_axis(lp, read_label[:, None], axis=-1)[:, 0]
        nll = jnp.sum(seg * (-nll_weight * tok_lp)[:, None], 0)  # [N]: mean over templates of mean over tokens
        kl_read = jnp.sum(jnp.exp(lp) * (lp - kl_init), axis=-1)  # KL(current ‖ initial)
        kl = jnp.sum(kl_seg * kl_read[:, None], 0)
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
    suffix: bool = True,
) -> ValueResult:
    """Optimise one δ per request of `problem` (see the module docstring). `suffix=False` runs
    every step on all T positions (the reference form of the cached-prefix fast path)."""
    if settings.num_steps < 1:
        raise ValueError("v_num_grad_steps must be >= 1")
    b, p = problem.batch, problem
    s = p.suffix_length() if suffix else b.tokens.shape[1]
    out = _optimise(params, cfg, settings, s, *(jnp.asarray(a) for a in (
        b.tokens, b.attn_mask, b.subject_last, p.row_request, p.init_row, p.read_row, p.read_pos, p.read_label,
        p.read_request, p.nll_weight, p.is_kl)))
    delta, v_init, loss, nll, kl, steps, evals = distributed.fetch(out)  # gathered where split across processes
    return ValueResult(np.asarray(delta), np.asarray(v_init), np.asarray(loss), np.asarray(nll), np.asarray(kl),
                       np.asarray(steps), int(evals))
