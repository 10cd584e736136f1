"""MEND meta-training: everything that makes a trained editor, apart from the edit path in
`mirage_jax.editing.mend` (this module imports it, never the reverse).

- the meta-loss ``cedit·NLL(edit | edited) + cloc·KL(pre ‖ post on locality) [+ crephrase·NLL(rephrase)]``
  and its optimiser (`meta_optimizer`);
- `train_editor`, the one training loop: validation on held-out edits, early stopping, best +
  rolling latest orbax checkpoints, resume (without validation edits, a bare loop);
- `validate_editor` / `post_edit_nll`, the validation metrics;
- `mend_training_edits`, the training material from a ZsRE training split or a CounterFact file
  (records 5000+ for training, the first 5000 left for evaluation);
- `resolve_archive`, `launch.py`'s archive lookup / train-on-demand;
- the explicit train command, e.g. for a long run on an accelerator:

    python -m mirage_jax.editing.mend_train --train_data=data/counterfact-edit.json \
        --steps=300 --val_size=20 --limit=2000 --val_every=50 --hp lr=1e-4 --hp rank=256

The editor lands in ``results/mend/<model>/best`` (where launch.py looks), its score and
architecture in ``best.json``; a killed run continues from ``latest/`` when started again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mirage_jax import distributed, io
from mirage_jax.datasets import load_counterfact, load_zsre, read_records
from mirage_jax.editing.common import target_nll
from mirage_jax.editing.mend import (
    MENDConfig,
    apply_editor,
    architecture,
    editor_net,
    load_editor,
    make_editor,
    mend_edit,
    save_editor,
    with_archive_architecture,
)
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import make_batch

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
    new, _, new_stats = apply_editor(net, variables, params, cfg, hp, *edit, update_stats=True)
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
    """One unbucketed batch as jnp arrays (tokens, attn_mask, target_mask): meta-training sees one
    request at a time, so padding rows would only cost compute."""
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


def post_edit_nll(params: Any, cfg: ModelConfig, tokenizer: Any, edits: Sequence[tuple[str, str]],
                  hp: MENDConfig, editor: dict | None = None) -> float:
    """Mean post-edit target NLL over `edits`, each applied alone to `params` (validation)."""
    out = []
    for p, t in edits:
        new, _ = mend_edit(params, cfg, tokenizer, [SimpleNamespace(prompt=p, target_new=t)], hp, editor)
        tokens, attn, tmask = _batches(tokenizer, [p], [t])
        out.append(float(target_nll(forward(new, cfg, tokens, attn_mask=attn).logits, tokens, tmask)))
    return float(np.mean(out))


# --- validation ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("net", "cfg", "hp"))
def _post_edit_metrics(net, variables, params, cfg, hp, edit, probes):
    """Edit with the `edit` batch, then (teacher-forced target-token accuracy, target NLL) of the
    edited model on each batch of `probes` (the edit itself, its rephrase, ...)."""
    new, _, _ = apply_editor(net, variables, params, cfg, hp, *edit)
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
    net = editor_net(cfg, params, hp)
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


# --- training data --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MENDTrainingData:
    """Meta-training material: `edits` (prompt, target_new), `locality` (question, answer) and
    held-out `val_edits` (prompt, target_new) for validation / early stopping (empty: none, a bare
    training loop). `rephrases` / `val_rephrases` are the paraphrased prompts of `edits` /
    `val_edits`, index by index (empty when the data has none; needed for `crephrase > 0`)."""

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


def _is_zsre(records: list) -> bool:
    """MEND-format ZsRE records have 'src'; CounterFact records do not."""
    return bool(records) and isinstance(records[0], dict) and "src" in records[0]


def mend_training_edits(path: str, start: int | None = None, val_size: int = 200,
                        limit: int | None = None) -> MENDTrainingData:
    """Training material for MEND meta-training from a ZsRE training split (MEND format, e.g.
    ``zsre_mend_train.json``; every record is used, ``start`` defaults to 0) or, without one, a
    CounterFact file (e.g. ``data/counterfact-edit.json``; ``start`` defaults to 5000).

    Records ``[0, start)`` are **never touched**: in a CounterFact file they stay reserved for
    evaluating the edits (the runner's ``--ds_size`` takes the first records). Records ``start``
    onwards (at most `limit` of them) are used: the last `val_size` are the held-out validation
    edits, the rest are training edits (prompt, target_new), and every used training record with
    a locality pair contributes (locality prompt, answer); each record's rephrased prompt (its own
    prompt where it has none) fills `rephrases` / `val_rephrases`. Malformed records are skipped."""
    zsre = _is_zsre(read_records(path))  # a JSON list or JSONL
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


# --- the training loop: validation, early stopping, best/latest checkpoints, resume -------------


def _save_latest(path: str, tree: dict, meta: dict) -> None:
    """The resumable training state (editor, optimiser state, counters) at `path`, replaced whole."""

    def write(tmp: str) -> None:
        os.makedirs(tmp)
        save_editor(os.path.join(tmp, "state"), tree)
        io.write_json(os.path.join(tmp, "meta.json"), meta)

    io.replace_dir(path, write)


def _load_latest(path: str, seed: int, like: dict) -> tuple[dict, dict] | None:
    """(state tree shaped like `like`, meta) saved by `_save_latest` at `path`; None if there is none."""
    meta_path = os.path.join(io.recover_dir(path), "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["seed"] != seed:  # the data order is a function of the seed: another one cannot continue
        raise ValueError(f"train_editor: {path} was written with seed {meta['seed']}, not {seed}")
    return load_editor(os.path.join(path, "state"), like), meta


def _save_best(out_dir: str, editor: dict, meta: dict) -> None:
    """The editor at ``out_dir/best`` (usable as ``--hp archive=``), its score and architecture in
    ``out_dir/best.json`` (read back by `with_archive_architecture`)."""
    io.replace_dir(os.path.join(out_dir, "best"), lambda tmp: save_editor(tmp, editor))
    io.write_json(os.path.join(out_dir, "best.json"), meta)


def train_editor(params: Any, cfg: ModelConfig, tokenizer: Any, data: MENDTrainingData, hp: MENDConfig,
                 steps: int, *, out_dir: str | None = None, val_every: int = 100, patience: int = 5,
                 min_delta: float = 0.0, resume: bool = False, seed: int = 0, progress: bool = True,
                 on_step: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Meta-train a MEND editor: the one training loop (the train command, `resolve_archive`, the
    benchmark and the tests all run it).

    One training edit (with its rephrase when ``hp.crephrase > 0``) + one locality pair per step
    (the seed's batch size 1), both drawn in a seeded per-epoch shuffled order (`_order`). Every
    `val_every` steps and at the last step:
    - with `data.val_edits`, the editor is validated (`validate_editor`: post-edit edit success
      and NLL, and rephrase success when the data has `val_rephrases`). A strictly better edit
      success (by more than `min_delta`) makes it the best editor, saved to ``out_dir/best`` with
      its score in ``out_dir/best.json``; otherwise a patience counter grows and training stops
      once it reaches `patience` validations. (This fixes spec 4.5's seed bugs: the stopper is
      updated, and the *best* editor is kept, not the latest.)
    - with `out_dir`, ``out_dir/latest`` holds editor variables, optimiser state (incl. the
      gradient accumulator), step, best score, patience counter and the data seed (data
      position = step); ``resume=True`` continues from it.
    Without `data.val_edits` there is no validation and no early stopping: the final editor is
    returned. `on_step(step)` is called after every step (a test hook).

    Returns (editor variables: the best validated one, else the final one; info: step, best_score
    (-inf without validation), best_step, stopped_early, history of validations, per-step log of
    this process)."""
    if steps < 1 or val_every < 1 or patience < 1:
        raise ValueError("train_editor: steps, val_every and patience must be >= 1")
    if not data.edits or not data.locality:
        raise ValueError("train_editor: need training edits and locality pairs")
    if hp.crephrase and not data.rephrases:
        raise ValueError("train_editor: crephrase > 0 needs rephrased prompts (MENDTrainingData.rephrases)")
    net, init = make_editor(cfg, params, hp)
    trainable, stats = init["params"], init["norm_stats"]
    opt_state = _cached_optimizer(hp).init(trainable)
    step, best, best_step, bad, history = 0, -np.inf, -1, 0, []
    best_editor, latest = init, None
    if out_dir:
        out_dir = os.path.abspath(out_dir)
        latest = os.path.join(out_dir, "latest")
        os.makedirs(out_dir, exist_ok=True)
    found = _load_latest(latest, seed, {"params": trainable, "norm_stats": stats, "opt_state": opt_state}) \
        if (resume and latest) else None
    if found:
        tree, meta = found
        trainable, stats, opt_state = tree["params"], tree["norm_stats"], tree["opt_state"]
        step, best, best_step, bad, history = (meta["step"], meta["best"], meta["best_step"], meta["bad"],
                                               meta["history"])
        best = -np.inf if best is None else best
        if best_step >= 0:
            best_editor = load_editor(io.recover_dir(os.path.join(out_dir, "best")), init)
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
                if data.val_edits:
                    val = validate_editor(params, cfg, tokenizer, data.val_edits, hp, variables,
                                          data.val_rephrases)
                    history.append({"step": step, **val})
                    if val["edit_success"] > best + min_delta:
                        best, best_step, bad = val["edit_success"], step, 0
                        best_editor = jax.device_get(variables)
                        if out_dir:
                            _save_best(out_dir, best_editor, {"step": step, **val, "hparams": architecture(hp)})
                    else:
                        bad += 1
                    stopped = bad >= patience
                    post = {"val_success": f"{val['edit_success']:.3f}", "best": f"{best:.3f}", **post}
                if latest:
                    _save_latest(latest, {"params": trainable, "norm_stats": stats, "opt_state": opt_state},
                                 {"step": step, "best": best, "best_step": best_step, "bad": bad, "seed": seed,
                                  "history": history})
                bar.set_postfix(**post)
            elif step % 10 == 0:
                bar.set_postfix(**post)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
    if not data.val_edits:
        best_editor = {"params": trainable, "norm_stats": stats}
    info = {"step": step, "best_score": float(best), "best_step": best_step, "stopped_early": stopped,
            "history": history, "log": log}
    return best_editor, info


# --- the archive a run uses ---------------------------------------------------------------------


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
    best = io.recover_dir(default_archive_dir(model.name, root))
    distributed.check_same(str(os.path.exists(best)), f"whether the MEND archive {best} exists")
    if not os.path.exists(best) and train_data:
        data = mend_training_edits(train_data, **{k: train_kw.pop(k) for k in ("start", "val_size", "limit")
                                                  if k in train_kw})
        train_editor(model.params, model.cfg, model.tokenizer, data, hp, train_steps, out_dir=os.path.dirname(best),
                     resume=True, **train_kw)
    distributed.check_same(str(os.path.exists(best)), f"whether the MEND archive {best} exists (process 0 wrote it)")
    if not os.path.exists(best):
        raise ValueError(f"MEND needs a trained editor: none at {best}; pass --hp archive=<dir>, or train one with "
                         f"--mend_train_data=<zsre_mend_train.json | counterfact.json> [--mend_train_steps=N] "
                         f"or python -m mirage_jax.editing.mend_train")
    return with_archive_architecture(dataclasses.replace(hp, archive=best))


# --- the train command ---------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    """Train, print where the editor is and how to use it."""
    from absl import flags

    from configs import get_hparams
    from mirage_jax.cli import load_model_from_flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model_from_flags()
        hp = get_hparams("MEND", model.name, f.hp, key=f.hparams_for)
        data = mend_training_edits(f.train_data, start=f.start, val_size=f.val_size, limit=f.limit)
        # (the training folder: the editor goes to its best/, where launch.py looks for it)
        out = os.path.abspath(f.out_dir or os.path.dirname(default_archive_dir(model.name)))
        _, info = train_editor(model.params, model.cfg, model.tokenizer, data, hp, f.steps, out_dir=out,
                               val_every=f.val_every, patience=f.patience, resume=f.resume, seed=f.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{len(data.edits)} training edits, {len(data.val_edits)} validation edits; stopped at step "
          f"{info['step']}{' (early)' if info['stopped_early'] else ''}; best validation edit success "
          f"{info['best_score']:.3f} at step {info['best_step']}")
    best = os.path.join(out, "best")
    print(f"editor: {best}  (python launch.py --method=MEND --hp archive={best})")


def _flags() -> None:
    from absl import flags

    from mirage_jax import cli

    cli.define_model_flags(compile_cache=cli.USER_COMPILE_CACHE)
    cli.define_hparam_flags()
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("train_data", None, "ZsRE training split (MEND format) or a CounterFact file", required=True)
    flags.DEFINE_integer("steps", 1000, "meta-training steps (one edit + one locality pair each)")
    flags.DEFINE_string("out_dir", None, "checkpoint directory (default results/mend/<model>; best/ is the editor)")
    flags.DEFINE_integer("start", None, "first record used (default: 5000 for CounterFact, 0 for ZsRE)")
    flags.DEFINE_integer("val_size", 200, "held-out validation edits (the last records used)")
    flags.DEFINE_integer("limit", None, "use at most this many records")
    flags.DEFINE_integer("val_every", 100, "steps between validations (and checkpoints)")
    flags.DEFINE_integer("patience", 5, "validations without improvement before stopping")
    flags.DEFINE_integer("seed", 0, "data order seed")
    flags.DEFINE_bool("resume", True, "continue from <out_dir>/latest when it exists")


if __name__ == "__main__":
    from absl import app

    _flags()
    app.run(main)
