"""The baseline of `benchmarks/mend.py`: MEND the way the seed runs it, in eager PyTorch.

The seed (spec 4.5) records each inner `nn.Linear`'s input x with a forward hook and its output
gradient δ with a backward hook, maps (x, δ) through the same per-shape low-rank residual MLP,
and differentiates the post-edit losses through patched weights (`higher`; here
`torch.func.functional_call`, its modern equivalent). This module is that pipeline, written to be
fair: inference mode where nothing is differentiated, gradients only on the inner weights, the
same batches (our `make_batch` tokens, explicit left-padding positions) and the same editor size.

It is a timing baseline with one correctness hook: an untrained editor (identity) must give the
same new weights as ours, which `mend.py` prints as a max |difference|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def inner_linears(model, inner):
    return [getattr(model.model.layers[l].mlp, PROJ[n]) for l, n in inner]


def weight_names(inner):
    return [f"model.layers.{l}.mlp.{PROJ[n]}.weight" for l, n in inner]


class LowRankLayer(torch.nn.Module):
    """h ← h·(1+scale_m) + shift_m; h ← h + act(h V U + b), U = 0 at init (identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        rank = min(rank, dim)
        self.scale = torch.nn.Parameter(torch.zeros(n_modes, dim))
        self.shift = torch.nn.Parameter(torch.zeros(n_modes, dim))
        self.v = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(dim, rank)))
        self.u = torch.nn.Parameter(torch.zeros(rank, dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))
        self.relu = relu

    def forward(self, h, mode: int):
        h = h * (1 + self.scale[mode]) + self.shift[mode]
        pre = (h @ self.v) @ self.u + self.bias
        return h + (F.relu(pre) if self.relu else pre)


class ShapeNet(torch.nn.Module):
    """g for one weight shape, with running (Welford) mean/std normalisation of x and δ."""

    def __init__(self, x_dim: int, d_dim: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.x_dim = x_dim
        self.layers = torch.nn.ModuleList(LowRankLayer(x_dim + d_dim, rank, n_modes, i < n_hidden)
                                          for i in range(n_hidden + 1))
        for k, dim in (("x", x_dim), ("d", d_dim)):
            self.register_buffer(f"{k}_mean", torch.zeros(dim))
            self.register_buffer(f"{k}_m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update_stats(self, x, d):
        n = x.shape[0]
        c = self.count + n
        for k, val in (("x", x), ("d", d)):
            mean, m2 = getattr(self, f"{k}_mean"), getattr(self, f"{k}_m2")
            bmean = val.mean(0)
            diff = bmean - mean
            m2 += ((val - bmean) ** 2).sum(0) + diff ** 2 * self.count * n / c
            mean += diff * n / c
        self.count.copy_(c)

    def normalise(self, k, val):
        if self.count < 2:
            return val
        mean, m2 = getattr(self, f"{k}_mean"), getattr(self, f"{k}_m2")
        return (val - mean) / ((m2 / (self.count - 1)).sqrt() + 1e-7)

    def forward(self, x, d, mode: int):
        h = torch.cat([self.normalise("x", x), self.normalise("d", d)], -1)
        for layer in self.layers:
            h = layer(h, mode)
        return h[:, : self.x_dim], h[:, self.x_dim:]


class TorchMEND(torch.nn.Module):
    """One `ShapeNet` per distinct (in, out) shape, told its matrix by a mode index, and η."""

    def __init__(self, model, inner, rank: int, n_hidden: int, edit_lr: float):
        super().__init__()
        self.inner = tuple(inner)
        shapes = [tuple(m.weight.shape[::-1]) for m in inner_linears(model, inner)]  # (in, out)
        self.distinct = list(dict.fromkeys(shapes))
        self.group = [self.distinct.index(s) for s in shapes]
        self.mode = [self.group[:i].count(g) for i, g in enumerate(self.group)]
        self.nets = torch.nn.ModuleList(ShapeNet(i, o, rank, n_hidden, self.group.count(g))
                                        for g, (i, o) in enumerate(self.distinct))
        self.edit_lrs = torch.nn.Parameter(torch.full((len(shapes),), edit_lr))


def _positions(attn):
    return (attn.cumsum(-1) - 1).clamp(min=0)


def target_nll(logits, tokens, target_mask):
    logp = logits[:, :-1].float().log_softmax(-1)
    tok = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    m = target_mask[:, 1:]
    return (-(tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def token_pairs(model, inner, batch):
    """Hooks record x (forward) and δ (backward) on each inner Linear; one backward of the edit NLL."""
    tokens, attn, tmask = batch
    xs, ds, handles = {}, {}, []
    for i, lin in enumerate(inner_linears(model, inner)):
        def fwd(mod, inp, out, i=i):
            xs[i] = inp[0].detach()
            out.register_hook(lambda g, i=i: ds.__setitem__(i, g.detach()))
        handles.append(lin.register_forward_hook(fwd))
    try:
        logits = model(input_ids=tokens, attention_mask=attn, position_ids=_positions(attn)).logits
        target_nll(logits, tokens, tmask).backward()
    finally:
        for h in handles:
            h.remove()
    flat = lambda a: a.reshape(-1, a.shape[-1]).float()  # noqa: E731
    out = []
    for i in range(len(inner)):
        x, d = flat(xs[i]), flat(ds[i])
        keep = (x != 0).any(-1) & (d != 0).any(-1)  # the seed's nz_mask
        out.append((x[keep], d[keep]))
    return out


def new_weights(model, mend: TorchMEND, pairs, update_stats: bool = False):
    """{weight name: W − η_m Σ δ̃ x̃ᵀ}, differentiable in the editor's parameters."""
    out = {}
    for m, ((x, d), lin, name) in enumerate(zip(pairs, inner_linears(model, mend.inner), weight_names(mend.inner))):
        net = mend.nets[mend.group[m]]
        if update_stats:
            net.update_stats(x, d)
        xt, dt = net(x, d, mend.mode[m])
        out[name] = lin.weight.float() - mend.edit_lrs[m] * (dt.T @ xt)
    return out


def edit(model, mend: TorchMEND, batch):
    """One MEND edit -> the new inner weights (the seed's editing time path)."""
    model.zero_grad(set_to_none=True)
    pairs = token_pairs(model, mend.inner, batch)
    with torch.no_grad():
        return new_weights(model, mend, pairs)


def _call(model, weights, batch):
    dtype = next(model.parameters()).dtype
    tokens, attn, _ = batch
    return torch.func.functional_call(model, {k: w.to(dtype) for k, w in weights.items()},
                                      args=(), kwargs=dict(input_ids=tokens, attention_mask=attn,
                                                           position_ids=_positions(attn))).logits


def meta_step(model, mend: TorchMEND, opt, step: int, hp, edit_batch, loc_batch):
    """cedit·NLL(edited) + cloc·KL(pre ‖ post) on the locality answer; accumulate, clip, Adam."""
    model.zero_grad(set_to_none=True)
    pairs = token_pairs(model, mend.inner, edit_batch)
    weights = new_weights(model, mend, pairs, update_stats=True)
    edit_loss = target_nll(_call(model, weights, edit_batch), *edit_batch[::2])
    with torch.no_grad():
        pre = model(input_ids=loc_batch[0], attention_mask=loc_batch[1], position_ids=_positions(loc_batch[1])).logits
    post = _call(model, weights, loc_batch)
    m = loc_batch[2][:, 1:]
    lp, lq = pre[:, :-1].float().log_softmax(-1), post[:, :-1].float().log_softmax(-1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) * m).sum() / m.sum().clamp(min=1)
    loss = hp.cedit * edit_loss + hp.cloc * kl
    (loss / hp.accumulate).backward()
    if (step + 1) % hp.accumulate == 0:
        torch.nn.utils.clip_grad_norm_(mend.parameters(), hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimizer(mend: TorchMEND, hp):
    lrs = [mend.edit_lrs]
    rest = [p for n, p in mend.named_parameters() if n != "edit_lrs"]
    return torch.optim.Adam([{"params": rest, "lr": hp.lr}, {"params": lrs, "lr": hp.lr_lr}])


def prepare(model, inner):
    """Gradients on the inner weights only, as the seed sets it up."""
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in inner_linears(model, inner):
        lin.weight.requires_grad_(True)
    return model
