"""The baseline of `benchmarks/edit_speed.py`: ROME, MEMIT and FT-M the way the reference runs them,
in eager PyTorch, on a `transformers` model holding our weights (`common.torch_twin`).

The reference (ROME's `compute_u` / `compute_v`, MEMIT's `compute_z` / `compute_ks`, EasyEdit's
FT; spec 4.1, 4.2, 4.4) optimises the value vector δ like this: every step runs the *whole* model
-- all layers, all positions -- with a forward hook that adds δ to the edited site (the MLP output
of layer ℓ for ROME, the residual leaving layer ℓ for MEMIT) at each row's subject-last token,
takes the log-softmax over the whole vocabulary at every position, gathers the target tokens and
back-propagates into δ alone (the weights have ``requires_grad`` off). MEMIT optimises its
requests' z one request at a time, then reads keys with one forward per edit layer and solves its
normal equations in float64. FT-M runs the whole model per step with gradients on one kernel.

To be fair and checkable, the baseline is fed exactly what ours is: the rows, left padding and
packed reads of `values.build_problem` (explicit positions, as `positions_from_mask`), the same
loss (mean over templates of the mean target-token NLL, KL(current ‖ initial) at the KL prompt's
subject-last token, ‖δ‖ / ‖v_init‖²), Adam, norm clamp and stop rule; so δ and the new kernels
must agree with ours (tests/test_rome.py, tests/test_memit.py) and only the engineering differs.
Benchmark and test code only: the library never imports torch.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F


def _positions(attn: torch.Tensor) -> torch.Tensor:
    return (attn.cumsum(-1) - 1).clamp(min=0)


def _t(a, dtype=None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _down(model, layer: int) -> torch.nn.Linear:
    return model.model.layers[layer].mlp.down_proj


def _site_module(model, layer: int, site: str) -> torch.nn.Module:
    """What the δ hook wraps: the MLP of `layer` ('mlp_out', ROME) or the whole decoder layer ('residual', MEMIT)."""
    return model.model.layers[layer].mlp if site == "mlp_out" else model.model.layers[layer]


@contextmanager
def _hooks(*pairs):
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, attention_mask=attn, position_ids=_positions(attn)).logits


def value_optimisation(model, problem, vs) -> dict:
    """δ for the one request of `problem` (a `values.ValueProblem`) under `vs` (`values.ValueSettings`)."""
    if len(problem.init_row) != 1:
        raise ValueError("the reference optimises one request at a time")
    b = problem.batch
    tokens, attn = _t(b.tokens, torch.long), _t(b.attn_mask, torch.long)
    subject_last = _t(b.subject_last, torch.long)
    at_subject = F.one_hot(subject_last, tokens.shape[1])[:, :, None]  # [B, T, 1]
    read_row, read_pos = _t(problem.read_row, torch.long), _t(problem.read_pos, torch.long)
    label, weight = _t(problem.read_label, torch.long), _t(problem.nll_weight, torch.float32)
    kl_read = int(np.nonzero(problem.is_kl)[0][0])
    init_row = int(problem.init_row[0])
    dtype = next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(False)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    state = {"v_init": None, "kl_init": None}

    def add_delta(module, inputs, out):
        out = out[0] if isinstance(out, tuple) else out
        if state["v_init"] is None:  # the site's value for the plain prompt, first pass
            state["v_init"] = out[init_row, subject_last[init_row]].detach().float().clone()
        return out + at_subject.to(out.dtype) * delta.to(dtype)

    opt = torch.optim.Adam([delta], lr=vs.lr)
    steps, loss = 0, None
    with _hooks((_site_module(model, vs.layer, vs.site), add_delta)):
        for it in range(vs.num_steps):
            opt.zero_grad()
            logits = _run(model, tokens, attn)
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # every position, every token
            lp = log_probs[read_row, read_pos]  # [P, V]
            nll = -(weight * lp.gather(1, label[:, None])[:, 0]).sum()
            cur = lp[kl_read]
            if state["kl_init"] is None:
                state["kl_init"] = cur.detach().clone()
            kl = torch.sum(cur.exp() * (cur - state["kl_init"]))
            decay = vs.weight_decay * torch.norm(delta) / torch.norm(state["v_init"]) ** 2
            loss = nll + vs.kl_factor * kl + decay
            if loss.item() < vs.stop_loss or it == vs.num_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            max_norm = vs.clamp_norm_factor * state["v_init"].norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return {"delta": delta.detach().numpy().copy(), "v_init": state["v_init"].numpy(), "loss": float(loss.detach()),
            "nll": float(nll.detach()), "kl": float(kl.detach()), "steps": steps}


@torch.no_grad()
def read_at_subject(model, batch, layer: int, top: int | None = None):
    """Down-projection input k and output W k (+ b) of `layer` at each row's subject-last token, and
    (with `top`) the residual leaving layer `top` there; one whole-model forward."""
    tokens, attn = _t(batch.tokens, torch.long), _t(batch.attn_mask, torch.long)
    rows, last = torch.arange(tokens.shape[0]), _t(batch.subject_last, torch.long)
    got = {}

    def down(module, inputs, out):
        got["k"], got["wk"] = inputs[0][rows, last].float(), out[rows, last].float()

    pairs = [(_down(model, layer), down)]
    if top is not None:
        def resid(module, inputs, out):
            got["h"] = (out[0] if isinstance(out, tuple) else out)[rows, last].float()
        pairs.append((model.model.layers[top], resid))
    with _hooks(*pairs):
        _run(model, tokens, attn)
    return got


def rome_edit(model, problem, vs, m: int) -> tuple[np.ndarray, dict]:
    """ROME on `model` in place for the one request of `problem` (m templates, the first the plain
    prompt): u = mean templated key / ‖·‖, δ, r = (v* − W k) / (k · u), W ← W + r uᵀ. Returns the
    new down-projection kernel in our layout ([F, d]) and the value optimisation's result."""
    got = read_at_subject(model, problem.batch, vs.layer)
    u = got["k"][:m].mean(0)
    u = u / u.norm()
    val = value_optimisation(model, problem, vs)
    v_star = torch.from_numpy(val["v_init"] + val["delta"])
    k, wk = got["k"][0], got["wk"][0]
    right = (v_star - wk) / torch.dot(k, u)
    w = _down(model, vs.layer).weight
    with torch.no_grad():
        w.copy_((w.float() + torch.outer(right, u)).to(w.dtype))
    return w.detach().float().numpy().T.copy(), val


def memit_edit(model, problems, batch_problem, m: int, vs, layers, covs: dict, lam: float) -> dict:
    """MEMIT on `model` in place: z per request (one value optimisation per request, `problems`),
    then per edit layer the keys of every row of `batch_problem` (all requests at once, m template
    rows per request, then the KL rows) and (λ C + Kᵀ K) Δ = Kᵀ R in float64. Returns {layer: kernel [F, d]}."""
    z = torch.stack([torch.from_numpy(val["v_init"] + val["delta"])
                     for val in (value_optimisation(model, p, vs) for p in problems)])
    n = len(problems)
    top, out = vs.layer, {}
    for j, layer in enumerate(layers):
        got = read_at_subject(model, batch_problem.batch, layer, top)
        k = got["k"][: n * m].reshape(n, m, -1)
        keys = (0.5 * (k[:, 0] + k[:, 1:].mean(1)) if m > 1 else k[:, 0]).double()
        resid = ((z - got["h"][: n * m : m]) / (len(layers) - j)).double()
        a = lam * covs[layer].double() + keys.T @ keys
        delta = torch.linalg.solve(a, keys.T @ resid)  # [F, d]
        w = _down(model, layer).weight
        with torch.no_grad():
            w.copy_((w.float() + delta.T.float()).to(w.dtype))
        out[layer] = w.detach().float().numpy().T.copy()
    return out


def ft_m_edit(model, batch, layer: int, hp) -> dict:
    """FT-M on `model` in place: Adam on one down projection, teacher-forced target NLL of a
    `tokens.make_batch` batch, no step once the loss is below `early_stop_loss`."""
    tokens, attn = _t(batch.tokens, torch.long), _t(batch.attn_mask, torch.long)
    tmask = _t(batch.target_mask, torch.float32)[:, 1:]
    for p in model.parameters():
        p.requires_grad_(False)
    w = _down(model, layer).weight
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=hp.lr, weight_decay=hp.weight_decay)
    steps, loss = 0, None
    for _ in range(hp.num_steps):
        opt.zero_grad()
        logp = torch.log_softmax(_run(model, tokens, attn)[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        per_row = -(tok * tmask).sum(-1) / tmask.sum(-1).clamp(min=1)
        has = tmask.sum(-1) > 0
        loss = per_row[has].mean()
        if loss.item() < hp.early_stop_loss:
            break
        loss.backward()
        opt.step()
        steps += 1
    w.requires_grad_(False)
    return {"steps": steps, "loss": float(loss.detach()), "kernel": w.detach().float().numpy().T.copy()}
