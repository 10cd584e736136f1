"""MEND: a learned hypernetwork that turns one fine-tuning gradient into an edit (spec 4.5).

For every edited ("inner") MLP matrix ``W`` (Flax kernel ``[in, out]``, ``y = x W``) the gradient
of the edit loss L is a sum of per-token outer products, ``∂L/∂W = Σ_t x_t δ_tᵀ`` with
``x_t`` the matrix input at token t and ``δ_t = ∂L/∂y_t``. MEND maps each pair through a small
network g (shared per weight shape, told which matrix it is by a learned scale/shift "mode"):

    (x̃_t, δ̃_t) = g_shape(norm(x_t), norm(δ_t); mode = m),    G_m = Σ_t x̃_t δ̃_tᵀ,
    W_m ← W_m − η_m G_m                                           (η_m learned, init edit_lr)

g is ``n_hidden + 1`` low-rank residual layers ``h ← h·(1+scale_m) + shift_m; h ← h + act(h V U + b)``
with ``U = 0`` at init, so an untrained editor with identity normalisation is exactly one SGD
step of size ``edit_lr`` on the inner kernels. Normalisation uses running mean/std per weight
shape (Welford, updated only while meta-training), as the seed's ``GradientTransform``.

No hooks: x is read from the forward (``mlp_in`` for gate/up, ``mlp_key`` for down) and δ is the
gradient of L w.r.t. a zero per-token bias ``[B, T, out]`` added to the matrix output (a pure
pytree substitution; ``x @ kernel + bias`` broadcasts).

Deviations from the seed code (spec 4.5), deliberate:
- Sign: ``W − η G`` (a descent step when untrained). The seed adds (``descent: false``); after
  meta-training either sign works because g and η can absorb it. ``MENDConfig.descent`` keeps it.
- Edit loss: teacher-forced NLL of the target tokens from `make_batch` (the seed's labels are the
  target re-tokenised with BOS and aligned to the last |labels| predictions **[QUIRK]**).
- Tokens whose x or δ is all zero are masked out (the seed drops them: ``nz_mask``).
- Optional rephrase term ``crephrase``: the post-edit NLL of the target after the edit's
  paraphrase, as in the MEND paper (the seed builds that batch and ignores it; default 0).

Editor: Flax **linen** (`MENDNet`); its variables are ``{"params", "norm_stats"}``.

Meta-training: `train_mend` (a bare loop) or `train_editor` (validation on held-out edits, early
stopping, best + rolling latest orbax checkpoints, resume); `mend_training_edits` splits a
CounterFact file (records 5000+ for training, the first 5000 left for evaluation);
`resolve_archive` is `launch.py`'s archive lookup / train-on-demand.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirage_jax.editing.common import check_layers, replace_mlp, replace_mlp_kernels
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch

Inner = tuple[tuple[int, str], ...]
MATRICES = ("gate", "up", "down")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MENDConfig:
    # edited (layer, matrix) pairs; paper: gate/up/down of layers 29-31 of the 32-layer models
    inner_params: Inner = tuple((l, n) for l in (29, 30, 31) for n in MATRICES)
    rank: int = 1920  # rank of each low-rank layer of g (capped at the layer width)
    n_hidden: int = 1  # hidden layers of g (g has n_hidden + 1 low-rank residual layers)
    norm: bool = True  # normalise x and δ with running mean/std before g
    descent: bool = True  # W ← W − ηG; False is the seed's W + ηG
    edit_lr: float = 1e-4  # initial per-matrix step size η
    lr: float = 1e-6  # Adam learning rate of g (meta-training)
    lr_lr: float = 1e-4  # Adam learning rate of the step sizes η
    cedit: float = 0.1  # weight of the post-edit NLL in the meta-loss
    cloc: float = 1.0  # weight of KL(pre ‖ post) on the locality inputs
    # Weight of the post-edit target NLL after a *rephrased* prompt (the MEND paper's equivalence
    # loss). The seed builds the rephrase batch and never uses it, so 0 reproduces the seed.
    crephrase: float = 0.0
    accumulate: int = 10  # edits whose meta-gradients are accumulated per optimiser step
    grad_clip: float = 100.0  # global-norm clip of the meta-gradient
    batch_size: int = 1  # requests per edit in batch mode
    archive: str | None = None  # orbax checkpoint of a trained editor; None = untrained (identity) editor
    seed: int = 0  # PRNG seed of the editor initialisation

    def __post_init__(self):  # JSON (--hp, best.json) gives lists; the jit cache needs hashable tuples
        object.__setattr__(self, "inner_params", tuple((int(l), str(n)) for l, n in self.inner_params))


# --- the edit loss and the per-token pairs (x, δ) -------------------------------------------


def target_nll(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Teacher-forced NLL of the target tokens, mean over each row's targets, mean over rows
    that have targets (padding rows and prompt tokens contribute nothing)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    m = target_mask[:, 1:]
    per_row = -(tok_lp * m).sum(-1) / jnp.maximum(m.sum(-1), 1)
    rows = target_mask.sum(-1) > 0
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(rows.sum(), 1)


def _read_site(name: str) -> str:
    return "mlp_key" if name == "down" else "mlp_in"


def inner_kernels(params: Any, inner: Inner) -> dict[tuple[int, str], jax.Array]:
    return {(l, n): params["layers"][l]["mlp"][n]["kernel"] for l, n in inner}



def token_pairs(params: Any, cfg: ModelConfig, inner: Inner, tokens, attn_mask, target_mask, *,
                start: int = 0, hidden=None):
    """-> (loss, {(layer, name): (x [B, T, in], δ [B, T, out])}) by one `jax.vjp`.

    δ is the cotangent of a zero per-token bias added to each inner matrix's output, so
    ``Σ_t x_t δ_tᵀ`` is exactly ∂loss/∂kernel."""
    b, t = tokens.shape
    zeros = {k: jnp.zeros((b, t, params["layers"][k[0]]["mlp"][k[1]]["kernel"].shape[1]), jnp.float32)
             for k in inner}
    reads = tuple(sorted({(_read_site(n), l) for l, n in inner}))

    def loss_fn(token_bias):
        def leaf(l, n):
            p = params["layers"][l]["mlp"][n]
            bias = token_bias[(l, n)].astype(p["kernel"].dtype)
            return dict(p, bias=p["bias"] + bias if "bias" in p else bias)

        p = replace_mlp(params, {k: leaf(*k) for k in inner})
        out = forward(p, cfg, tokens if hidden is None else None, attn_mask=attn_mask,
                      start_layer=start, hidden=hidden, reads=reads)
        return target_nll(out.logits, tokens, target_mask), out.reads

    loss, vjp_fn, acts = jax.vjp(loss_fn, zeros, has_aux=True)
    (deltas,) = vjp_fn(jnp.ones_like(loss))
    pairs = {(l, n): (acts[(_read_site(n), l)].astype(jnp.float32), deltas[(l, n)]) for l, n in inner}
    return loss, pairs


# --- the editor network -----------------------------------------------------------------------


class LRLinear(nn.Module):
    """One low-rank residual layer with per-matrix scale/shift ("mode") embeddings; identity at init."""

    dim: int
    rank: int
    n_modes: int
    relu: bool

    @nn.compact
    def __call__(self, h: jax.Array, mode: int) -> jax.Array:
        scale = self.param("mode_scale", nn.initializers.zeros, (self.n_modes, self.dim))
        shift = self.param("mode_shift", nn.initializers.zeros, (self.n_modes, self.dim))
        h = h * (1.0 + scale[mode]) + shift[mode]
        rank = min(self.rank, self.dim)
        v = self.param("v", nn.initializers.xavier_uniform(), (self.dim, rank))
        u = self.param("u", nn.initializers.zeros, (rank, self.dim))  # zero: output = input at init
        bias = self.param("bias", nn.initializers.zeros, (self.dim,))
        pre = (h @ v) @ u + bias
        return h + (jax.nn.relu(pre) if self.relu else pre)


class GradientTransform(nn.Module):
    """g for one weight shape: running-normalise x and δ, concatenate, low-rank residual MLP, split."""

    x_dim: int
    d_dim: int
    rank: int
    n_hidden: int
    n_modes: int
    norm: bool

    @nn.compact
    def __call__(self, x, d, mask, mode: int, update_stats: bool):
        """x [N, in], δ [N, out], mask [N] (1 = a real token). Returns (x̃, δ̃), masked."""
        stats = {}
        for key, dim in (("x", self.x_dim), ("d", self.d_dim)):
            stats[key] = (self.variable("norm_stats", f"{key}_mean", jnp.zeros, (dim,)),
                          self.variable("norm_stats", f"{key}_m2", jnp.zeros, (dim,)))
        count = self.variable("norm_stats", "count", jnp.zeros, ())
        if update_stats:  # batched Welford update with this call's real tokens
            n = mask.sum()
            c_new = count.value + n
            for key, val in (("x", x), ("d", d)):
                mean, m2 = stats[key]
                bmean = (val * mask[:, None]).sum(0) / jnp.maximum(n, 1)
                bm2 = (jnp.square(val - bmean) * mask[:, None]).sum(0)
                diff = bmean - mean.value
                mean.value = mean.value + diff * n / jnp.maximum(c_new, 1)
                m2.value = m2.value + bm2 + jnp.square(diff) * count.value * n / jnp.maximum(c_new, 1)
            count.value = c_new
        if self.norm:
            def normalise(key, val):
                mean, m2 = stats[key]
                # Untrained (fewer than 2 tokens seen): identity, so g starts as plain SGD.
                have = count.value >= 2
                std = jnp.where(have, jnp.sqrt(m2.value / jnp.maximum(count.value - 1, 1)), 1.0)
                return (val - jnp.where(have, mean.value, 0.0)) / (std + jnp.where(have, 1e-7, 0.0))

            x, d = normalise("x", x), normalise("d", d)
        h = jnp.concatenate([x, d], axis=-1)
        for i in range(self.n_hidden + 1):
            h = LRLinear(self.x_dim + self.d_dim, self.rank, self.n_modes, relu=i < self.n_hidden,
                         name=f"layer{i}")(h, mode)
        h = h * mask[:, None]
        return h[:, : self.x_dim], h[:, self.x_dim:]


def _shape_groups(shapes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Distinct shapes (in order of appearance), each matrix's shape index and its mode in it."""
    distinct, group, mode = [], [], []
    for s in shapes:
        if s not in distinct:
            distinct.append(s)
        group.append(distinct.index(s))
        mode.append(sum(1 for g in group[:-1] if g == group[-1]))
    return distinct, group, mode


class MENDNet(nn.Module):
    """All of MEND's learned parts: one `GradientTransform` per weight shape and the step sizes η.

    `shapes[m]` is the kernel shape ``(in, out)`` of inner matrix m. Returns the pseudo-gradients
    ``G_m = Σ_t x̃_t δ̃_tᵀ`` (kernel layout ``[in, out]``) and η ``[M]``."""

    shapes: tuple[tuple[int, int], ...]
    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    edit_lr: float = 1e-4

    @nn.compact
    def __call__(self, xs, ds, masks, update_stats: bool = False):
        distinct, group, mode = _shape_groups(self.shapes)
        nets = [GradientTransform(i, o, self.rank, self.n_hidden, group.count(g), self.norm, name=f"g_{i}x{o}")
                for g, (i, o) in enumerate(distinct)]
        lrs = self.param("edit_lrs", nn.initializers.constant(self.edit_lr), (len(self.shapes),))
        grads = []
        for m, (x, d, mask) in enumerate(zip(xs, ds, masks)):
            xt, dt = nets[group[m]](x, d, mask, mode[m], update_stats)
            grads.append(xt.T @ dt)
        return grads, lrs


def make_editor(cfg: ModelConfig, params: Any, hp: MENDConfig) -> tuple[MENDNet, dict]:
    """The editor module for this model's inner matrices and its initial (identity) variables."""
    check_layers([l for l, _ in hp.inner_params], cfg.num_layers, "MEND")
    for l, n in hp.inner_params:
        if n not in params["layers"][l]["mlp"]:
            have = sorted(params["layers"][l]["mlp"])
            raise ValueError(f"MEND: inner param ({l}, {n!r}) not in this model; its MLP has {have}")
    shapes = tuple(tuple(int(s) for s in params["layers"][l]["mlp"][n]["kernel"].shape) for l, n in hp.inner_params)
    return _initial_editor(shapes, hp)


@functools.lru_cache(maxsize=4)  # one init per (model shapes, hp), not one per edit
def _initial_editor(shapes: tuple[tuple[int, int], ...], hp: MENDConfig) -> tuple[MENDNet, dict]:
    net = MENDNet(shapes, hp.rank, hp.n_hidden, hp.norm, hp.edit_lr)
    xs = [jnp.zeros((1, i)) for i, _ in shapes]
    ds = [jnp.zeros((1, o)) for _, o in shapes]
    variables = net.init(jax.random.PRNGKey(hp.seed), xs, ds, [jnp.zeros((1,))] * len(shapes))
    return net, jax.tree_util.tree_map(jnp.asarray, dict(variables))


@functools.lru_cache(maxsize=2)  # the runner edits many times with one archive
def _archived_editor(path: str, shapes: tuple[tuple[int, int], ...], hp: MENDConfig) -> dict:
    return load_editor(path, _initial_editor(shapes, hp)[1])


# --- applying an edit -------------------------------------------------------------------------


def _apply_editor(net: MENDNet, variables, params, cfg, hp: MENDConfig, tokens, attn_mask, target_mask,
                  update_stats: bool = False):
    """(edited params, pre-edit loss, new norm stats). Differentiable in `variables["params"]`."""
    loss, pairs = token_pairs(params, cfg, hp.inner_params, tokens, attn_mask, target_mask)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    xs = [flat(pairs[k][0]) for k in hp.inner_params]
    ds = [flat(pairs[k][1]) for k in hp.inner_params]
    masks = [((x != 0).any(-1) & (d != 0).any(-1)).astype(jnp.float32) for x, d in zip(xs, ds)]
    if update_stats:
        (grads, lrs), new_state = net.apply(variables, xs, ds, masks, True, mutable=["norm_stats"])
        stats = new_state["norm_stats"]
    else:
        grads, lrs = net.apply(variables, xs, ds, masks, False)
        stats = variables["norm_stats"]
    sign = -1.0 if hp.descent else 1.0
    w = inner_kernels(params, hp.inner_params)
    new = {k: w[k].astype(jnp.float32) + sign * lrs[m] * grads[m] for m, k in enumerate(hp.inner_params)}
    return replace_mlp_kernels(params, new), loss, stats


@functools.partial(jax.jit, static_argnames=("net", "cfg", "hp"))
def _edit(net, variables, params, cfg, hp, tokens, attn_mask, target_mask):
    new, loss, _ = _apply_editor(net, variables, params, cfg, hp, tokens, attn_mask, target_mask)
    return inner_kernels(new, hp.inner_params), loss  # only the edited leaves leave the jit


@functools.lru_cache(maxsize=None)
def _warn_once(dtype: str) -> None:
    log.warning("MEND on %s weights: an update η·G below the weights' resolution is rounded away "
                "(default model, untrained editor: 80%% of the inner-kernel entries change in float32, "
                "0.05%% in bfloat16); edit in float32 where memory allows, as the seed does", dtype)


def _warn_low_precision(params: Any, hp: MENDConfig) -> None:
    """Once per dtype: a warning when the edited kernels are stored in less than float32 (the
    update is cast to the kernel dtype, see `replace_mlp_kernels`)."""
    l, n = hp.inner_params[0]
    dtype = params["layers"][l]["mlp"][n]["kernel"].dtype
    if jnp.finfo(dtype).bits < 32:
        _warn_once(str(dtype))


def mend_edit(params: Any, cfg: ModelConfig, tokenizer: Any, requests: Sequence[Any], hp: MENDConfig,
              editor: dict | None = None) -> tuple[Any, dict]:
    """Edit with MEND -> (new params, info). `editor` is the editor's variables (from `train_mend`
    or `load_editor`); None loads `hp.archive`, or builds the untrained identity editor (one SGD
    step of size `edit_lr`). The input pytree is untouched."""
    net, init = make_editor(cfg, params, hp)
    _warn_low_precision(params, hp)
    if editor is None:
        editor = _archived_editor(hp.archive, net.shapes, hp) if hp.archive else init
    b = make_batch(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    kernels, loss = _edit(net, editor, params, cfg, hp, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                          jnp.asarray(b.target_mask))
    return replace_mlp_kernels(params, kernels), {"loss": float(loss), "trained_editor": editor is not init}


# --- meta-training ------------------------------------------------------------------------------


def _answer_kl(pre_logits, post_logits, target_mask):
    """KL(pre ‖ post) of the next-token distributions predicting the answer tokens, mean per token."""
    m = target_mask[:, 1:]
    lp, lq = jax.nn.log_softmax(pre_logits[:, :-1], -1), jax.nn.log_softmax(post_logits[:, :-1], -1)
    kl = (jnp.exp(lp) * (lp - lq)).sum(-1)
    return (kl * m).sum() / jnp.maximum(m.sum(), 1)


def _meta_loss(trainable, stats, net, params, cfg, hp, edit, loc, rephrase=None):
    """cedit·NLL(edit | edited) + cloc·KL(pre ‖ post on loc) [+ crephrase·NLL(rephrase | edited)].

    `edit`, `loc`, `rephrase` are (tokens, attn_mask, target_mask) batches; only the editor's
    variables are differentiated (x and δ depend on the frozen model alone)."""
    variables = {"params": trainable, "norm_stats": stats}
    new, _, new_stats = _apply_editor(net, variables, params, cfg, hp, *edit, update_stats=True)
    nll = lambda b: target_nll(forward(new, cfg, b[0], attn_mask=b[1]).logits, b[0], b[2])  # noqa: E731
    edit_loss = nll(edit)
    pre = jax.lax.stop_gradient(forward(params, cfg, loc[0], attn_mask=loc[1]).logits)
    loc_kl = _answer_kl(pre, forward(new, cfg, loc[0], attn_mask=loc[1]).logits, loc[2])
    loss = hp.cedit * edit_loss + hp.cloc * loc_kl
    if rephrase is not None:
        loss = loss + hp.crephrase * nll(rephrase)
    return loss, (new_stats, edit_loss, loc_kl)


def meta_optimizer(hp: MENDConfig) -> optax.GradientTransformation:
    """Clip, then Adam `lr` on g and Adam `lr_lr` on η, stepping every `accumulate` edits."""
    labels = lambda tree: {k: ("lrs" if k == "edit_lrs" else "net") for k in tree}  # noqa: E731
    inner = optax.chain(optax.clip_by_global_norm(hp.grad_clip),
                        optax.multi_transform({"net": optax.adam(hp.lr), "lrs": optax.adam(hp.lr_lr)}, labels))
    return optax.MultiSteps(inner, every_k_schedule=hp.accumulate)


def _batches(tokenizer, prompts, targets):
    b = make_batch(tokenizer, prompts, targets, batch_bucket=False)
    return jnp.asarray(b.tokens), jnp.asarray(b.attn_mask), jnp.asarray(b.target_mask)


@functools.lru_cache(maxsize=8)  # one optimiser (hence one compiled meta step) per hp
def _cached_optimizer(hp: MENDConfig) -> optax.GradientTransformation:
    return meta_optimizer(hp)


@functools.partial(jax.jit, static_argnames=("net", "cfg", "hp"))
def _meta_step(net, cfg, hp, trainable, stats, opt_state, params, edit, loc, rephrase=None):
    (loss, (new_stats, el, kl)), g = jax.value_and_grad(_meta_loss, has_aux=True)(
        trainable, stats, net, params, cfg, hp, edit, loc, rephrase)
    upd, opt_state = _cached_optimizer(hp).update(g, opt_state, trainable)
    return optax.apply_updates(trainable, upd), new_stats, opt_state, loss, el, kl


def train_mend(params: Any, cfg: ModelConfig, tokenizer: Any, edits: Sequence[tuple[str, str]],
               locality: Sequence[tuple[str, str]], hp: MENDConfig, steps: int, editor: dict | None = None
               ) -> tuple[dict, list[dict]]:
    """Meta-train the editor on `edits` (prompt, target) with `locality` (question, answer) inputs,
    one edit + one locality pair per step, cycling through both (the seed's batch_size 1).
    Returns the trained variables and a per-step log (meta-loss, post-edit NLL, locality KL)."""
    net, init = make_editor(cfg, params, hp)
    variables = init if editor is None else editor
    opt = _cached_optimizer(hp)
    edit_batches = [_batches(tokenizer, [p], [t]) for p, t in edits]
    loc_batches = [_batches(tokenizer, [p], [t]) for p, t in locality]

    trainable, stats = variables["params"], variables["norm_stats"]
    opt_state = opt.init(trainable)
    log = []
    for i in range(steps):
        trainable, stats, opt_state, loss, el, kl = _meta_step(
            net, cfg, hp, trainable, stats, opt_state, params, edit_batches[i % len(edit_batches)],
            loc_batches[i % len(loc_batches)])
        log.append({"loss": float(loss), "edit_nll": float(el), "loc_kl": float(kl)})
    return {"params": trainable, "norm_stats": stats}, log


def post_edit_nll(params: Any, cfg: ModelConfig, tokenizer: Any, edits: Sequence[tuple[str, str]],
                  hp: MENDConfig, editor: dict | None = None) -> float:
    """Mean post-edit target NLL over `edits`, each applied alone to `params` (validation)."""
    from types import SimpleNamespace

    out = []
    for p, t in edits:
        new, _ = mend_edit(params, cfg, tokenizer, [SimpleNamespace(prompt=p, target_new=t)], hp, editor)
        tokens, attn, tmask = _batches(tokenizer, [p], [t])
        out.append(float(target_nll(forward(new, cfg, tokens, attn_mask=attn).logits, tokens, tmask)))
    return float(np.mean(out))


# --- checkpoints ------------------------------------------------------------------------------


def save_editor(path: str, editor: dict) -> None:
    """Write the editor's variables as an orbax checkpoint at `path` (absolute, must not exist)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, editor)


def load_editor(path: str, like: dict) -> dict:
    """Read an editor saved by `save_editor`; `like` (e.g. `make_editor(...)[1]`) gives the tree.

    An editor trained for other inner matrices, rank or depth is a one-line ValueError naming the
    first leaf that differs (not orbax's restore error from deep inside its event loop)."""
    import orbax.checkpoint as ocp

    def shapes(tree):  # the editor's own variables (an optimiser state's tree differs on disk)
        return {jax.tree_util.keystr(k): tuple(v.shape) for part in ("params", "norm_stats")
                for k, v in jax.tree_util.tree_leaves_with_path({part: tree.get(part, {})})}

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        stored, want = shapes(getattr(meta, "item_metadata", meta)), shapes(like)
        if stored != want:
            key = next(k for k in sorted(set(stored) | set(want)) if stored.get(k) != want.get(k))
            raise ValueError(f"MEND editor {path} does not fit this model and config: {key} is "
                             f"{stored.get(key, 'absent')} there, {want.get(key, 'absent')} here; use the "
                             f"inner_params / rank / n_hidden it was trained with (--hp key=value)")
        return ckpt.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))


# --- training with validation, early stopping, best/latest checkpoints and resume --------------


@functools.partial(jax.jit, static_argnames=("net", "cfg", "hp"))
def _post_edit_metrics(net, variables, params, cfg, hp, edit, probes):
    """Edit with the `edit` batch, then (teacher-forced target-token accuracy, target NLL) of the
    edited model on each batch of `probes` (the edit itself, its rephrase, ...)."""
    new, _, _ = _apply_editor(net, variables, params, cfg, hp, *edit)
    out = []
    for tokens, attn_mask, target_mask in probes:
        logits = forward(new, cfg, tokens, attn_mask=attn_mask).logits
        m = target_mask[:, 1:]
        hit = (jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]).astype(jnp.float32)
        out.append(((hit * m).sum() / jnp.maximum(m.sum(), 1), target_nll(logits, tokens, target_mask)))
    return out


def validate_editor(params: Any, cfg: ModelConfig, tokenizer: Any, edits: Sequence[tuple[str, str]],
                    hp: MENDConfig, editor: dict, rephrases: Sequence[str] = ()) -> dict:
    """Each held-out edit (prompt, target) applied alone -> {"edit_success": mean teacher-forced
    target-token accuracy after the edit, "post_nll": mean post-edit target NLL}, plus
    "rephrase_success" (the same accuracy after `rephrases[i]`, edit i's paraphrase) when given."""
    net, _ = make_editor(cfg, params, hp)
    rows = []
    for i, (p, t) in enumerate(edits):
        edit = _batches(tokenizer, [p], [t])
        probes = (edit, _batches(tokenizer, [rephrases[i]], [t])) if rephrases else (edit,)
        rows.append([float(v) for pair in _post_edit_metrics(net, editor, params, cfg, hp, edit, probes)
                     for v in pair])
    rows = np.asarray(rows)
    out = {"edit_success": float(rows[:, 0].mean()), "post_nll": float(rows[:, 1].mean())}
    if rephrases:
        out["rephrase_success"] = float(rows[:, 2].mean())
    return out


@dataclasses.dataclass(frozen=True)
class MENDTrainingData:
    """Meta-training material: `edits` (prompt, target_new), `locality` (question, answer) and
    held-out `val_edits` (prompt, target_new) for validation / early stopping. `rephrases` /
    `val_rephrases` are the paraphrased prompts of `edits` / `val_edits`, index by index (empty
    when the data has none; needed for `crephrase > 0`)."""

    edits: tuple[tuple[str, str], ...]
    locality: tuple[tuple[str, str], ...]
    val_edits: tuple[tuple[str, str], ...]
    rephrases: tuple[str, ...] = ()
    val_rephrases: tuple[str, ...] = ()

    def __post_init__(self):
        for name, got, want in (("rephrases", self.rephrases, self.edits),
                                ("val_rephrases", self.val_rephrases, self.val_edits)):
            if got and len(got) != len(want):
                raise ValueError(f"MENDTrainingData: {name} has {len(got)} entries for {len(want)} edits")


def _is_zsre(path: str) -> bool:
    """MEND-format ZsRE records have 'src'; CounterFact records do not."""
    import json

    with open(path) as f:
        records = json.load(f)
    return bool(records) and isinstance(records[0], dict) and "src" in records[0]


def mend_training_edits(path: str, start: int | None = None, val_size: int = 200,
                        limit: int | None = None) -> MENDTrainingData:
    """Training material for MEND meta-training from a ZsRE training split (MEND format, e.g.
    ``zsre_mend_train.json``; every record is used, ``start`` defaults to 0) or, without one, a
    CounterFact file (e.g. ``../shared/data/counterfact-edit.json``; ``start`` defaults to 5000).

    Records ``[0, start)`` are **never touched**: in a CounterFact file they stay reserved for
    evaluating the edits (the runner's ``--ds_size`` takes the first records). Records ``start``
    onwards (at most `limit` of them) are used: the last `val_size` are the held-out validation
    edits, the rest are training edits (prompt, target_new), and every used training record with
    a locality pair contributes (locality prompt, answer); each record's rephrased prompt (its own
    prompt where it has none) fills `rephrases` / `val_rephrases`. Malformed records are skipped."""
    from mirage_jax.datasets import load_counterfact, load_zsre

    zsre = _is_zsre(path)
    start = (0 if zsre else 5000) if start is None else start
    reqs = list((load_zsre if zsre else load_counterfact)(path, skip_bad=True).requests)
    reqs = [r for r in reqs if r.case_id >= start]
    if limit is not None:
        reqs = reqs[:limit]
    if len(reqs) <= val_size:
        raise ValueError(f"MEND training data: {path} has {len(reqs)} usable records from index {start}; "
                         f"need more than val_size={val_size}")
    train, val = reqs[: len(reqs) - val_size], reqs[len(reqs) - val_size:]
    loc = tuple((lp.prompt, lp.answer) for r in train for lp in r.locality[:1])
    if not loc:
        raise ValueError(f"MEND training data: no locality pairs in {path} from index {start}")
    rephrase = lambda rs: tuple(r.rephrase or r.prompt for r in rs)  # noqa: E731
    return MENDTrainingData(tuple((r.prompt, r.target_new) for r in train), loc,
                            tuple((r.prompt, r.target_new) for r in val), rephrase(train), rephrase(val))


def _order(n: int, seed: int, stream: int, i: int) -> int:
    """Index of step i's example: a fresh seeded permutation every epoch, so the data position is
    a pure function of (seed, step) and a resumed run sees exactly the same sequence."""
    epoch, pos = divmod(i, n)
    return int(np.random.default_rng([seed, stream, epoch]).permutation(n)[pos])


def _atomic_save(path: str, write) -> None:
    """write(tmp_dir) then replace `path` by it; a kill leaves either the old or the new one
    (or `path + '.new'`, which `_recover` restores)."""
    import shutil

    tmp = path + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _recover(path: str) -> str:
    """`path`, restored from ``path + '.new'`` if a kill hit `_atomic_save` between its rmtree and
    its rename (the '.new' copy is complete whenever `path` is missing)."""
    if not os.path.exists(path) and os.path.exists(path + ".new"):
        os.replace(path + ".new", path)
    return path


def _save_latest(path: str, tree: dict, meta: dict) -> None:
    import json

    def write(tmp):
        os.makedirs(tmp)
        save_editor(os.path.join(tmp, "state"), tree)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)

    _atomic_save(path, write)


def _save_best(out_dir: str, editor: dict, meta: dict) -> None:
    import json

    _atomic_save(os.path.join(out_dir, "best"), lambda tmp: save_editor(tmp, editor))
    with open(os.path.join(out_dir, "best.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(out_dir, "best.json.tmp"), os.path.join(out_dir, "best.json"))


def train_editor(params: Any, cfg: ModelConfig, tokenizer: Any, data: MENDTrainingData, hp: MENDConfig,
                 steps: int, *, out_dir: str | None = None, val_every: int = 100, patience: int = 5,
                 min_delta: float = 0.0, resume: bool = False, seed: int = 0, progress: bool = True,
                 on_step=None) -> tuple[dict, dict]:
    """Meta-train a MEND editor with validation, early stopping and checkpoints (fixes spec 4.5's
    seed bugs: the stopper is updated, and the *best* editor is kept, not the latest).

    One training edit (with its rephrase when ``hp.crephrase > 0``) + one locality pair per step,
    both drawn in a seeded per-epoch shuffled order. Every `val_every` steps (and at the last step)
    the editor is validated on `data.val_edits` (`validate_editor`: post-edit edit success and NLL,
    and rephrase success when the data has `val_rephrases`). A strictly
    better edit success (by more than `min_delta`) saves the editor to ``out_dir/best`` (plain
    editor variables, usable as ``--hp archive=``; score in ``out_dir/best.json``); otherwise a
    patience counter grows and training stops once it reaches `patience` validations. After each
    validation ``out_dir/latest`` holds editor variables, optimiser state (incl. the gradient
    accumulator), step, best score, patience counter and the data seed (data position = step);
    ``resume=True`` continues from it. `on_step(step)` is called after every step (a test hook).

    Returns (best editor variables, info: step, best_score, best_step, stopped_early, history of
    validations, per-step log of this process)."""
    import json

    from tqdm.auto import tqdm

    if steps < 1 or val_every < 1 or patience < 1:
        raise ValueError("train_editor: steps, val_every and patience must be >= 1")
    if not data.edits or not data.locality or not data.val_edits:
        raise ValueError("train_editor: need training edits, locality pairs and validation edits")
    if hp.crephrase and not data.rephrases:
        raise ValueError("train_editor: crephrase > 0 needs rephrased prompts (MENDTrainingData.rephrases)")
    net, init = make_editor(cfg, params, hp)
    opt = _cached_optimizer(hp)
    trainable, stats = init["params"], init["norm_stats"]
    opt_state = opt.init(trainable)
    step, best, best_step, bad, history = 0, -np.inf, -1, 0, []
    best_editor = init
    latest = None
    if out_dir:
        out_dir = os.path.abspath(out_dir)
        latest = os.path.join(out_dir, "latest")
        os.makedirs(out_dir, exist_ok=True)
    found = _recover(latest) if (resume and latest) else None
    if found and os.path.exists(os.path.join(found, "meta.json")):
        with open(os.path.join(found, "meta.json")) as f:
            meta = json.load(f)
        if meta["seed"] != seed:
            raise ValueError(f"train_editor: {found} was written with seed {meta['seed']}, not {seed}")
        tree = load_editor(os.path.join(found, "state"),
                           {"params": trainable, "norm_stats": stats, "opt_state": opt_state})
        trainable, stats, opt_state = tree["params"], tree["norm_stats"], tree["opt_state"]
        step, best, best_step, bad, history = (meta["step"], meta["best"], meta["best_step"], meta["bad"],
                                               meta["history"])
        best = -np.inf if best is None else best
        if best_step >= 0:
            best_editor = load_editor(_recover(os.path.join(out_dir, "best")), init)
    stopped = bad >= patience
    log = []
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="MEND", dynamic_ncols=True)
    try:
        while step < steps and not stopped:
            i = _order(len(data.edits), seed, 0, step)
            (ep, et), (lp, lt) = data.edits[i], data.locality[_order(len(data.locality), seed, 1, step)]
            edit, loc = _batches(tokenizer, [ep], [et]), _batches(tokenizer, [lp], [lt])
            rephrase = _batches(tokenizer, [data.rephrases[i]], [et]) if hp.crephrase else None
            trainable, stats, opt_state, loss, el, kl = _meta_step(net, cfg, hp, trainable, stats, opt_state,
                                                                   params, edit, loc, rephrase)
            step += 1
            log.append({"step": step, "loss": float(loss), "edit_nll": float(el), "loc_kl": float(kl)})
            bar.update(1)
            post = {"loss": f"{float(loss):.3f}"}
            if step % val_every == 0 or step == steps:
                variables = {"params": trainable, "norm_stats": stats}
                val = validate_editor(params, cfg, tokenizer, data.val_edits, hp, variables, data.val_rephrases)
                history.append({"step": step, **val})
                if val["edit_success"] > best + min_delta:
                    best, best_step, bad = val["edit_success"], step, 0
                    best_editor = jax.device_get(variables)
                    if out_dir:
                        _save_best(out_dir, best_editor, {"step": step, **val, "hparams": architecture(hp)})
                else:
                    bad += 1
                stopped = bad >= patience
                if latest:
                    _save_latest(latest, {"params": trainable, "norm_stats": stats, "opt_state": opt_state},
                                 {"step": step, "best": best, "best_step": best_step, "bad": bad, "seed": seed,
                                  "history": history})
                bar.set_postfix(val_success=f"{val['edit_success']:.3f}", best=f"{best:.3f}", **post)
            elif step % 10 == 0:
                bar.set_postfix(**post)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
    info = {"step": step, "best_score": float(best), "best_step": best_step, "stopped_early": stopped,
            "history": history, "log": log}
    return best_editor, info


ARCHITECTURE = ("inner_params", "rank", "n_hidden", "norm", "descent")  # what an archive fixes


def architecture(hp: MENDConfig) -> dict:
    """The fields a trained editor is bound to (its shapes and how its output is applied)."""
    return {k: getattr(hp, k) for k in ARCHITECTURE}


def with_archive_architecture(hp: MENDConfig) -> MENDConfig:
    """`hp` with the architecture recorded beside its archive (``<archive>.json``, written by
    `train_editor`), so an editor trained with ``--hp rank=256`` edits without repeating it.
    A differing request is logged, not silently kept: the archive decides."""
    import json

    meta_path = hp.archive.rstrip("/") + ".json"
    if not os.path.exists(meta_path):
        return hp
    with open(meta_path) as f:
        recorded = json.load(f).get("hparams")
    if not recorded:
        return hp
    archived = dataclasses.replace(hp, **{k: recorded[k] for k in ARCHITECTURE if k in recorded})
    differ = [k for k in ARCHITECTURE if getattr(archived, k) != getattr(hp, k)]
    if differ:
        log.warning("MEND archive %s was trained with %s; using those, not %s", hp.archive,
                    {k: getattr(archived, k) for k in differ}, {k: getattr(hp, k) for k in differ})
    return archived


def default_archive_dir(model_name: str, root: str = "results/mend") -> str:
    """Where `launch.py` keeps a model's trained MEND editor: ``<root>/<model name>/best``."""
    safe = model_name.strip("/").replace(os.sep, "_") or "model"
    return os.path.abspath(os.path.join(root, safe, "best"))


def resolve_archive(hp: MENDConfig, model: Any, train_data: str | None = None, train_steps: int = 200,
                    root: str = "results/mend", **train_kw) -> MENDConfig:
    """`hp` with `archive` set for a run: the given one, else ``<root>/<model>/best``, else (with
    `train_data`, a ZsRE training split or a CounterFact file) train one there first; otherwise a
    one-line ValueError."""
    if hp.archive:
        if not os.path.exists(hp.archive):
            raise ValueError(f"MEND archive {hp.archive} does not exist")
        return with_archive_architecture(dataclasses.replace(hp, archive=os.path.abspath(hp.archive)))
    best = _recover(default_archive_dir(model.name, root))
    if not os.path.exists(best) and train_data:
        data = mend_training_edits(train_data, **{k: train_kw.pop(k) for k in ("start", "val_size", "limit")
                                                  if k in train_kw})
        train_editor(model.params, model.cfg, model.tokenizer, data, hp, train_steps, out_dir=os.path.dirname(best),
                     resume=True, **train_kw)
    if not os.path.exists(best):
        raise ValueError(f"MEND needs a trained editor: none at {best}; pass --hp archive=<dir>, or train one with "
                         f"--mend_train_data=<zsre_mend_train.json | counterfact.json> [--mend_train_steps=N] "
                         f"or python -m mirage_jax.editing.mend_train")
    return with_archive_architecture(dataclasses.replace(hp, archive=best))

