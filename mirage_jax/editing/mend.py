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
- Edit loss: teacher-forced NLL of the target tokens from `make_batch` (`target_nll`, FT-M's
  objective too; the seed's labels are the target re-tokenised with BOS and aligned to the last
  |labels| predictions **[QUIRK]**).
- Tokens whose x or δ is all zero are masked out (the seed drops them: ``nz_mask``).
- Optional rephrase term ``crephrase``: the post-edit NLL of the target after the edit's
  paraphrase, as in the MEND paper (the seed builds that batch and ignores it; default 0).

Editor: Flax **linen** (`MENDNet`); its variables are ``{"params", "norm_stats"}``.

This module is the edit path: the config, the (x, δ) pairs, the editor network, `mend_edit` and
the editor archives (`save_editor` / `load_editor`, the architecture recorded beside them).
Meta-training (meta-loss, training loop with validation and checkpoints, training data, archive
lookup for `launch.py`) is `mirage_jax.editing.mend_train`, which imports this module and never
the reverse.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirage_jax.editing.common import check_layers, replace_mlp, replace_mlp_kernels, target_nll
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


# --- the per-token pairs (x, δ) of the edit loss's gradient ---------------------------------


def _read_site(name: str) -> str:
    """The forward read holding a matrix's input x: the MLP input for gate/up, the key for down."""
    return "mlp_key" if name == "down" else "mlp_in"


def inner_kernels(params: Any, inner: Inner) -> dict[tuple[int, str], jax.Array]:
    """The inner matrices' kernels ``{(layer, name): [in, out]}``."""
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


def editor_net(cfg: ModelConfig, params: Any, hp: MENDConfig) -> MENDNet:
    """The editor module for this model's inner matrices (a description: no weights, cheap)."""
    check_layers([l for l, _ in hp.inner_params], cfg.num_layers, "MEND")
    for l, n in hp.inner_params:
        if n not in params["layers"][l]["mlp"]:
            have = sorted(params["layers"][l]["mlp"])
            raise ValueError(f"MEND: inner param ({l}, {n!r}) not in this model; its MLP has {have}")
    shapes = tuple(tuple(int(s) for s in params["layers"][l]["mlp"][n]["kernel"].shape) for l, n in hp.inner_params)
    return MENDNet(shapes, hp.rank, hp.n_hidden, hp.norm, hp.edit_lr)


def initial_variables(net: MENDNet, hp: MENDConfig) -> dict:
    """The editor's initial variables: identity maps (an untrained edit is one SGD step of
    `edit_lr`), unit running statistics, seeded by `hp.seed`."""
    return dict(_init(net, hp.seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(net: MENDNet, seed: int) -> dict:
    # Jitted: an eager Flax init of rank-1920 layers costs ~0.2 s, more than the edit itself
    # (direct `mend_edit` calls without an editor pay it on every edit).
    xs = [jnp.zeros((1, i)) for i, _ in net.shapes]
    ds = [jnp.zeros((1, o)) for _, o in net.shapes]
    return net.init(jax.random.PRNGKey(seed), xs, ds, [jnp.zeros((1,))] * len(net.shapes))


def make_editor(cfg: ModelConfig, params: Any, hp: MENDConfig) -> tuple[MENDNet, dict]:
    """The editor module and its initial (identity) variables."""
    net = editor_net(cfg, params, hp)
    return net, initial_variables(net, hp)


def resolve_editor(net: MENDNet, hp: MENDConfig) -> dict:
    """The variables `hp` names for `net` (`editor_net`): the archive `hp.archive` (read once per
    run and passed to every edit, see `EditMethod.prepare`), else the untrained identity editor."""
    init = initial_variables(net, hp)
    return load_editor(hp.archive, init) if hp.archive else init


# --- applying an edit -------------------------------------------------------------------------


def apply_editor(net: MENDNet, variables, params, cfg, hp: MENDConfig, tokens, attn_mask, target_mask,
                 update_stats: bool = False):
    """(edited params, pre-edit loss, new norm stats). Differentiable in `variables["params"]`, so
    meta-training (`mend_train`) differentiates through it; `update_stats` folds this edit's (x, δ)
    into the running normalisation statistics (meta-training only)."""
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
    new, loss, _ = apply_editor(net, variables, params, cfg, hp, tokens, attn_mask, target_mask)
    return inner_kernels(new, hp.inner_params), loss  # only the edited leaves leave the jit


@functools.cache
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
    """Edit with MEND -> (new params, info). `editor` is the editor's variables (from
    `mend_train.train_editor`, `load_editor` or `resolve_editor`); None resolves `hp` now (reads
    `hp.archive`, or builds the untrained identity editor: one SGD step of size `edit_lr`).
    The input pytree is untouched."""
    net = editor_net(cfg, params, hp)
    _warn_low_precision(params, hp)
    trained = editor is not None or hp.archive is not None
    if editor is None:
        editor = resolve_editor(net, hp)
    b = make_batch(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    kernels, loss = _edit(net, editor, params, cfg, hp, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                          jnp.asarray(b.target_mask))
    return replace_mlp_kernels(params, kernels), {"loss": float(loss), "trained_editor": trained}


# --- editor archives ----------------------------------------------------------------------------


def save_editor(path: str, editor: dict) -> None:
    """Write the editor's variables as an orbax checkpoint at `path` (absolute, must not exist)."""
    import orbax.checkpoint as ocp  # about a second to import: paid only by those who touch archives

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
        meta = getattr(meta, "item_metadata", meta)
        if not hasattr(meta, "get"):  # a folder that is no orbax checkpoint (e.g. a training out_dir)
            hint = " (it holds a best/ folder: pass that)" if os.path.isdir(os.path.join(path, "best")) else ""
            raise ValueError(f"{path} is not a MEND editor checkpoint{hint}")
        stored, want = shapes(meta), shapes(like)
        if stored != want:
            key = next(k for k in sorted(set(stored) | set(want)) if stored.get(k) != want.get(k))
            raise ValueError(f"MEND editor {path} does not fit this model and config: {key} is "
                             f"{stored.get(key, 'absent')} there, {want.get(key, 'absent')} here; use the "
                             f"inner_params / rank / n_hidden it was trained with (--hp key=value)")
        return ckpt.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))


ARCHITECTURE = ("inner_params", "rank", "n_hidden", "norm", "descent")  # what an archive fixes


def architecture(hp: MENDConfig) -> dict:
    """The fields a trained editor is bound to (its shapes and how its output is applied)."""
    return {k: getattr(hp, k) for k in ARCHITECTURE}


def with_archive_architecture(hp: MENDConfig) -> MENDConfig:
    """`hp` with the architecture recorded beside its archive (``<archive>.json``, written by
    `mend_train.train_editor`), so an editor trained with ``--hp rank=256`` edits without repeating
    it. A differing request is logged, not silently kept: the archive decides."""
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
