"""WISE: a side memory for one MLP down projection, routed per sequence (spec 4.7).

The memory is data in the returned pytree (``layers[L]["mlp"]["wise"]``, see
`mirage_jax.model.adapters`): the side memory (a copy of the down kernel when a period starts),
the saved shards and each one's minimum recorded edit distance. The model's weights are never
touched. One edit:

1. a batch of 11 rows ``template(prompt) + " " + target`` (the seed's context templates, made once
   per run by `wise_templates`) and 1 irrelevant row (the request's first locality prompt with its
   answer: the seed's ZsRE ``loc_prompt`` file is missing, so the dataset's own locality prompts
   stand in); layers below L run once;
2. at most ``n_iter`` iterations in one jitted `lax.while_loop`: loss = target NLL of the 11 edit
   rows + `margin_loss` of the per-row distances between the activated outputs of the original
   and side kernels; SGD(``edit_lr``, weight decay) on the side kernel, its gradient multiplied by
   a Bernoulli(``mask_ratio``) mask fixed for the whole period, then clamped element-wise to
   ``W +- norm_constraint``; early stop when the last two losses differ by <= 1e-4 and the last is
   <= 0.02. The in-scope distance of the last forward is recorded (the adapter keeps the minimum);
3. every ``save_freq`` edits the side memory becomes a shard and restarts from W; every
   ``merge_freq`` edits the last ``merge_freq // save_freq`` shards are merged by `ties_merge`.

With ``use_chat_template`` (the seed's Llama-3-8B config) an edit row is the chat-wrapped
``template(prompt)`` (one user turn, generation prompt) + " " + target, as the seed's rows; the
irrelevant row stays plain. The runner then wraps the synthetic evaluation's prompts the same way
(spec 2.1 step 1), as the seed does for that config.

Deviations, on purpose: distances average over real tokens (the seed's padded batch averages
over pads too); the margin loss is the seed's (means over the *positive* entries, not over
all of them as spec 4.7's ``mean(relu(.))`` reads); a chat-wrapped row is tokenized without adding
special tokens again (the seed adds a second BOS on Llama-3, its quirk), as WILD's ``chat_temp``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.editing.common import Reads, check_layers, for_case, loss_reads, read_nll, replace_mlp
from mirage_jax.generate import chat_prompt
from mirage_jax.model.adapters import NO_ACT, WISE_ROUTERS, empty_wise, grow_wise, wise_act
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch

SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")
# Used only when a request has no locality prompt (the seed's loc_prompt file is missing anyway).
FALLBACK_IRRELEVANT = ("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving")


@dataclasses.dataclass(frozen=True)
class WISEConfig:
    layer: int = 27  # MLP whose down projection gets the side memory (paper: llama-2-7b layer 27)
    edit_lr: float = 1.0  # SGD learning rate
    n_iter: int = 70  # at most this many iterations (the last one only records the distance)
    mask_ratio: float = 0.2  # fraction of side-memory entries a period may change
    norm_constraint: float = 1.0  # element-wise bound on |W_side - W|
    act_margin: tuple[float, float, float] = (5.0, 20.0, 10.0)  # (alpha, beta, gamma) of the margin loss
    act_ratio: float = 0.88  # routing threshold = act_ratio x minimum recorded edit distance
    save_freq: int = 500  # edits per side-memory period (then it becomes a shard)
    merge_freq: int = 1000  # edits between TIES merges of the last merge_freq // save_freq shards
    densities: float = 0.53  # TIES: fraction of each task vector kept (largest magnitudes)
    weights: float = 1.0  # TIES: total weight, split evenly over the merged shards
    weight_decay: float = 1e-5  # the seed's SGD weight decay
    router: str = "sequence"  # 'sequence' (seed: re-decided over the growing answer) or 'prompt' (once)
    seed: int = 0  # PRNG seed of the gradient masks (folded with the period index)
    capacity: int = 2  # initial memory slots (side + shards); doubled when full
    # The seed's llama-3-8b: edit rows (and the synthetic evaluation's prompts) in the chat template.
    use_chat_template: bool = False


def margin_loss(d_in: jax.Array, d_out: jax.Array, margin: tuple[float, float, float]) -> jax.Array:
    """The seed's activation margin: with ``d_in`` ``[N]`` (edit rows) and ``d_out`` ``[K]``
    (irrelevant rows), ``pmean(d_out - d_in + gamma) + pmean(d_out - alpha) + pmean(beta - d_in)``
    where ``pmean`` is the mean of the positive entries (0 when none is), the first over all pairs."""
    alpha, beta, gamma = margin

    def pmean(x):
        pos = x > 0
        return jnp.sum(jnp.where(pos, x, 0.0)) / jnp.maximum(jnp.sum(pos), 1)

    return pmean(d_out[:, None] - d_in[None, :] + gamma) + pmean(d_out - alpha) + pmean(beta - d_in)


def ties_merge(base: jax.Array, tensors: jax.Array, weights: Sequence[float], density: float) -> jax.Array:
    """TIES merge of ``tensors`` ``[K, F, D]`` onto ``base``: task vectors ``t - base`` keep their
    ``int(density * size)`` largest magnitudes, each weighted; a sign per entry is elected by the
    sign of the weighted sum; the weighted mean over the task vectors that agree with it (0 where
    none does) is added to ``base``."""
    tv = (tensors - base[None]).astype(jnp.float32)
    flat = tv.reshape(tv.shape[0], -1)
    if density < 1:
        k = int(density * flat.shape[1])
        idx = jax.lax.top_k(jnp.abs(flat), k)[1]
        keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
        flat = jnp.where(keep, flat, 0.0)
    w = jnp.asarray(weights, jnp.float32)[:, None]
    wd = flat * w
    sign = jnp.where(jnp.sum(wd, axis=0) >= 0, 1.0, -1.0)
    agree = jnp.sign(wd) == sign[None]
    divisor = jnp.sum(w * agree, axis=0)
    mixed = jnp.sum(wd * agree, axis=0) / jnp.where(divisor == 0, 1.0, divisor)
    return (base.astype(jnp.float32) + mixed.reshape(base.shape)).astype(base.dtype)


def row_distances(key: jax.Array, w_orig: jax.Array, w_side: jax.Array, bias: jax.Array, attn: jax.Array,
                  gelu: jax.Array) -> jax.Array:
    """Per row: mean over real tokens of ``|act(key @ w_side + b) - act(key @ w_orig + b)|_2`` -> ``[B]``."""
    k, b = key.astype(jnp.float32), bias.astype(jnp.float32)
    d = jnp.linalg.norm(wise_act(gelu, k @ w_side.astype(jnp.float32) + b)
                        - wise_act(gelu, k @ w_orig.astype(jnp.float32) + b), axis=-1)
    m = attn.astype(jnp.float32)
    return jnp.sum(d * m, -1) / jnp.maximum(jnp.sum(m, -1), 1)


def gradient_mask(hp: WISEConfig, period: int, shape: tuple[int, ...]) -> jax.Array:
    """The period's mask: 1 with probability ``mask_ratio`` (drawn once per ``save_freq`` edits)."""
    return jax.random.bernoulli(jax.random.fold_in(jax.random.PRNGKey(hp.seed), period), hp.mask_ratio,
                                shape).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _hidden(params, cfg: ModelConfig, layer: int, tokens, attn):
    return forward(params, cfg, tokens, attn_mask=attn, stop_layer=layer, return_logits=False).hidden


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _train_side(params, cfg: ModelConfig, hp: WISEConfig, hidden, attn, reads: Reads, w_side, mask, gelu, bias):
    """The edit loop (see the module doc) -> (side kernel, recorded in-scope distance, iterations,
    first loss, last loss). ``params`` carry no WISE leaf at ``hp.layer``; the last row is the
    irrelevant one."""
    layer = hp.layer
    w_orig = params["layers"][layer]["mlp"]["down"]["kernel"]

    def loss_fn(w):
        mlp = params["layers"][layer]["mlp"]
        p = replace_mlp(params, {(layer, "down"): dict(mlp["down"], kernel=w.astype(w_orig.dtype))})
        out = forward(p, cfg, None, attn_mask=attn, start_layer=layer, hidden=hidden, reads=(("mlp_key", layer),),
                      return_logits=False)
        d = row_distances(out.reads[("mlp_key", layer)], w_orig, w, bias, attn, gelu)
        d_in, d_out = d[:-1], d[-1:]
        loss = read_nll(p, cfg, out.hidden, reads) + margin_loss(d_in, d_out, hp.act_margin)
        return loss, jnp.mean(d_in)

    grad = jax.value_and_grad(loss_fn, has_aux=True)
    lo, hi = w_orig.astype(jnp.float32) - hp.norm_constraint, w_orig.astype(jnp.float32) + hp.norm_constraint

    def cond(c):
        return ~c[-1]

    def body(c):
        i, w, val, pre, first, _, _, _ = c
        (loss, d_in), g = grad(w)
        stop = ((jnp.abs(val - pre) <= 1e-4) & (val <= 0.02)) | (i == hp.n_iter - 1)
        stepped = jnp.clip(w - hp.edit_lr * (g * mask + hp.weight_decay * w), lo, hi)
        w = jnp.where(stop, w, stepped)
        first = jnp.where(i == 0, loss, first)
        return i + 1, w, jnp.where(stop, val, loss), jnp.where(stop, pre, val), first, loss, d_in, stop

    init = (jnp.int32(0), w_side.astype(jnp.float32), jnp.float32(1e9), jnp.float32(0.0), jnp.float32(0.0),
            jnp.float32(0.0), jnp.float32(0.0), jnp.bool_(False))
    i, w, _, _, first, last, d_in, _ = jax.lax.while_loop(cond, body, init)
    return w.astype(w_side.dtype), d_in, i, first, last


def _check(hp: WISEConfig, cfg: ModelConfig) -> None:
    check_layers((hp.layer,), cfg.num_layers, "WISE")
    if hp.router not in WISE_ROUTERS:
        raise ValueError(f"WISE: router must be one of {', '.join(WISE_ROUTERS)}, got {hp.router!r}")
    if hp.n_iter < 1 or hp.save_freq < 1 or hp.merge_freq < hp.save_freq or hp.merge_freq % hp.save_freq:
        raise ValueError(f"WISE: need n_iter >= 1 and merge_freq a multiple of save_freq, got n_iter={hp.n_iter}, "
                         f"save_freq={hp.save_freq}, merge_freq={hp.merge_freq}")
    if hp.capacity < 2 or hp.capacity & (hp.capacity - 1):
        raise ValueError(f"WISE: capacity must be a power of two >= 2, got {hp.capacity}")


def wise_templates(params: Any, cfg: ModelConfig, tokenizer: Any, hp: Any = None) -> tuple[str, ...]:
    """The seed's 11 context templates: ``"{}"`` and the greedy 5- and 10-token continuations of
    each of `SEED_WORDS`, each followed by ``" {}"``."""
    from mirage_jax.generate import encode_prompts, generate_ids

    ids = encode_prompts(tokenizer, list(SEED_WORDS), True)
    out = ["{}"]
    for n in (5, 10):
        gens = generate_ids(params, cfg, tokenizer, ids, max_new_tokens=n)
        out += [(w + g.text).replace("{", " ").replace("}", " ") + " {}" for w, g in zip(SEED_WORDS, gens)]
    return tuple(out)


def save_and_merge(w: dict, w_orig: jax.Array, hp: WISEConfig) -> tuple[dict, list[str]]:
    """After ``w["edits"]`` edits: a full period's side memory becomes a shard (and the side memory
    restarts from W with no recorded distance); at a merge, the last ``merge_freq // save_freq``
    shards become one TIES merge that keeps the smallest of their recorded distances."""
    done, events = int(w["edits"]), []
    if done % hp.save_freq == 0:
        if int(w["count"]) == w["memories"].shape[0]:
            w = grow_wise(w)
        c = int(w["count"])
        w = dict(w, memories=w["memories"].at[c].set(w["memories"][0]).at[0].set(w_orig.astype(w["memories"].dtype)),
                 min_act=w["min_act"].at[c].set(w["min_act"][0]).at[0].set(NO_ACT), count=jnp.int32(c + 1))
        events.append("save")
    if done % hp.merge_freq == 0:
        k, c = hp.merge_freq // hp.save_freq, int(w["count"])
        if k > 1 and c - 1 >= k:
            lo = c - k
            merged = ties_merge(w_orig, w["memories"][lo:c], [hp.weights / k] * k, hp.densities)
            mem = w["memories"].at[lo].set(merged).at[lo + 1:c].set(0)
            min_act = w["min_act"].at[lo].set(jnp.min(w["min_act"][lo:c])).at[lo + 1:c].set(NO_ACT)
            w = dict(w, memories=mem, min_act=min_act, count=jnp.int32(lo + 1))
            events.append("merge")
    return w, events


def training_rows(tokenizer: Any, request: Any, templates: Sequence[str],
              use_chat_template: bool) -> tuple[list[str], list[str], list[bool]]:
    """The training rows of one edit as (prompts, targets, add_special_tokens): one per template,
    then the irrelevant row (the request's first locality prompt with its answer)."""
    loc = (request.locality[0].prompt, request.locality[0].answer) if request.locality else FALLBACK_IRRELEVANT
    texts = [t.format(request.prompt) for t in templates]
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("WISE: use_chat_template is set but this tokenizer has no chat template "
                             "(--hp use_chat_template=false)")
        texts = [chat_prompt(tokenizer, x) for x in texts]
    return (texts + [loc[0]], [request.target_new] * len(templates) + [loc[1]],
            [not use_chat_template] * len(templates) + [True])


def wise_edit(params: Any, cfg: ModelConfig, tokenizer: Any, requests: Sequence[Any], hp: WISEConfig,
              templates: Sequence[str] | None = None) -> tuple[Any, dict]:
    """One WISE edit -> (params with the updated adapter, info). The input pytree is untouched."""
    _check(hp, cfg)
    if len(requests) != 1:
        raise ValueError(f"WISE edits one request at a time, got {len(requests)}")
    [r] = requests
    templates = tuple(templates) if templates is not None else wise_templates(params, cfg, tokenizer)
    prompts, targets, special = for_case(r, training_rows, tokenizer, r, templates, hp.use_chat_template)
    b = for_case(r, functools.partial(make_batch, batch_bucket=False, add_special_tokens=special), tokenizer, prompts,
                 targets)
    layer = hp.layer
    mlp = params["layers"][layer]["mlp"]
    w_orig = mlp["down"]["kernel"]
    wa = dict(mlp["wise"]) if "wise" in mlp else empty_wise(w_orig, hp.capacity, hp.act_ratio, hp.router,
                                                            cfg.activation != "silu", mlp["down"].get("bias"))
    if int(wa["router"]) != WISE_ROUTERS.index(hp.router):
        raise ValueError(f"WISE: the memory at layer {layer} routes by {WISE_ROUTERS[int(wa['router'])]!r}, "
                         f"this edit asks for {hp.router!r}")
    plain = replace_mlp(params, {})
    plain["layers"][layer] = dict(plain["layers"][layer], mlp={k: v for k, v in mlp.items() if k != "wise"})
    tokens, attn = jnp.asarray(b.tokens), jnp.asarray(b.attn_mask)
    hidden = _hidden(plain, cfg, layer, tokens, attn)
    mask = gradient_mask(hp, int(wa["edits"]) // hp.save_freq, w_orig.shape)
    edit_rows = (np.arange(len(prompts)) < len(templates))[:, None]  # the irrelevant row trains no target
    reads = loss_reads(b.tokens, b.target_mask * edit_rows, b.prompt_last, "target_new")
    side, d_in, iters, loss0, loss = _train_side(plain, cfg, hp, hidden, attn, reads, wa["memories"][0], mask,
                                                 wa["gelu"], wa["bias"])
    wa = dict(wa, memories=wa["memories"].at[0].set(side), min_act=wa["min_act"].at[0].min(d_in),
              edits=wa["edits"] + 1)
    wa, events = save_and_merge(wa, w_orig, hp)
    info = {"distance": float(d_in), "min_distance": float(wa["min_act"][0]), "iterations": int(iters),
            "loss_before": float(loss0), "loss": float(loss), "memories": int(wa["count"]), "events": events}
    return replace_mlp(params, {(layer, "wise"): wa}), info
