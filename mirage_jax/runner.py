"""Single / sequential / batch editing experiments (spec 1.4-1.5), streamed and resumable.

The runner is the only module that knows both the editing methods and the evaluation.

* Pre-edit evaluation runs once per (model, data, evaluation settings) and is cached on disk
  under `{output_dir}/.pre_cache/`, written batch by batch, so a second method on the same data
  never recomputes it. In single mode a group's pre-edit pass runs right after the group's edits:
  its packed WILD prefill and teacher-forced scoring keep each prompt's layers below the lowest
  edited one (`generate.PromptStates`) and the post-edit pass starts the same prompts from there.
* single: every sample is evaluated on `original params + its own edit` -- restoring is free,
  the original pytree is simply kept -- and `stack_edits` such edited models are evaluated in one
  batched pass (`mirage_jax.model.stack`: only the leaves the edits changed are stacked);
  sequential: all edits, then all evaluations; batch: cumulative chunks of `batch_size` requests,
  then all evaluations.
* Each finished sample is one JSON line, flushed at once; `resume=True` skips the case ids
  already in the file. A summary JSON and a markdown table are written at the end.
* `eval_at` (sequential / batch): after the n-th edit, every request edited so far is evaluated
  on the current params and the means are one point of a curve (`summary["curve"]`), streamed to
  `{run}_curve.jsonl`; points already in the file are read back on resume, not evaluated again.
* sequential / batch: the edited params (as a difference from the original: `edit_checkpoint`) are
  written to `{run}_sequence.npz` every `checkpoint_every` edits and after the last, so a resumed
  lifelong run goes on from its last checkpoint instead of replaying hours of edits, and a kill
  during the final evaluation costs no edit at all. Without one (or with `checkpoint_every=0`) a
  resumed run replays every edit from the original model: the edits are deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from mirage_jax import distributed, edit_checkpoint, io
from mirage_jax.datasets import EditRequest
from mirage_jax.editing import EditMethod
from mirage_jax.evaluation import synthetic, wild
from mirage_jax.evaluation.answers import wrap_context
from mirage_jax.evaluation.judge import Judge, JudgeItem
from mirage_jax.generate import PromptStates
from mirage_jax.model import sharding, stack
from mirage_jax.model.adapters import has_adapters
from mirage_jax.model.diff import changed_leaves, path_steps

log = logging.getLogger(__name__)

EDIT_MODES = ("single", "sequential", "batch")
EVALUATIONS = ("wild", "synthetic", "both")
# Version of the summary JSON's layout; `mirage_jax.report` refuses other versions. Bump it when a key
# changes meaning or moves (adding a key is compatible).
SUMMARY_SCHEMA = 1


class RunError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class RunConfig:
    method: str
    model_name: str
    dataset: str
    data_path: str
    edit_mode: str = "single"  # 'single', 'sequential' or 'batch'
    batch_size: int = 1  # requests per edit in batch mode
    evaluation: str = "wild"  # 'wild', 'synthetic' or 'both'
    wild: wild.WildConfig = dataclasses.field(default_factory=wild.WildConfig)
    output_dir: str = "out"
    resume: bool = False  # continue a killed run: skip case ids already written
    # Requests evaluated together (sequential / batch modes, pre-edit). Their questions go to the
    # generator in one call, which pads batch and lengths to power-of-two buckets: any value here
    # compiles only a few programs, and a larger one amortises each host round trip over more rows.
    eval_batch: int = 16
    # Sequential / batch: also evaluate all requests edited so far after this many edits (the
    # paper's reliability-vs-number-of-edits curve); each n <= the number of requests.
    eval_at: tuple[int, ...] = ()
    # Synthetic evaluation also in the seed's generated variant (spec 2.2; `*_generated` keys). The
    # seed uses it for GRACE only; `run` turns it on for methods that declare `generated_synthetic`.
    generated_synthetic: bool = False
    # Synthetic prompts (edit, rephrase, locality) in the tokenizer's chat template, as the seed does
    # for a method config with `use_chat_template` (WISE on Llama-3-8B, spec 2.1 step 1); `run` turns
    # it on from the hyper-parameters.
    synthetic_chat: bool = False
    # Sequential / batch: write the edited params every this many edits and after the last (see the
    # module docstring); 0 = never, a resumed run then replays every edit.
    checkpoint_every: int = 10
    # Single mode: edits made from the original model, then evaluated this many at a time in one
    # batched pass (`mirage_jax.model.stack`); 1 = each on its own. None: 16 on every backend -- on a
    # CPU too since stop 15 (a decode step of 128 rows costs ~4x one of 8, not 16x; members prefilled
    # and scored in their own buckets): 1.5x faster evaluation there, measured (BUILD_NOTES). On a
    # device mesh: 1.
    stack_edits: int | None = None

    def __post_init__(self):
        if self.edit_mode not in EDIT_MODES:
            raise RunError(f"unknown edit_mode {self.edit_mode!r}; valid: {', '.join(EDIT_MODES)}")
        if self.evaluation not in EVALUATIONS:
            raise RunError(f"unknown evaluation {self.evaluation!r}; valid: {', '.join(EVALUATIONS)}")
        if self.batch_size < 1:
            raise RunError("batch_size must be >= 1")
        if self.checkpoint_every < 0:
            raise RunError("checkpoint_every must be >= 0 (0: never)")
        if self.stack_edits is not None and self.stack_edits < 1:
            raise RunError("stack_edits must be >= 1 (1: every single edit evaluated on its own)")
        if self.eval_at:
            if self.edit_mode == "single":
                raise RunError("eval_at needs edit_mode sequential or batch: single mode never accumulates edits")
            if any(n < 1 for n in self.eval_at) or list(self.eval_at) != sorted(set(self.eval_at)):
                raise RunError(f"eval_at must be increasing positive edit counts, got {list(self.eval_at)}")
            if self.edit_mode == "batch" and any(n % self.batch_size for n in self.eval_at):
                raise RunError(f"eval_at points must be multiples of batch_size={self.batch_size} (edits come in "
                               f"chunks), got {list(self.eval_at)}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("wild", "synthetic") if self.evaluation == "both" else (self.evaluation,)

    @property
    def run_name(self) -> str:
        ctx = self.wild.context_type if "wild" in self.kinds else "none"
        mode = self.edit_mode + (f"{self.batch_size}" if self.edit_mode == "batch" else "")
        return f"{self.method}_{self.model_name}_{self.dataset}_{mode}_{self.evaluation}_{ctx}"


# --- evaluation of a set of requests on one pytree --------------------------------------------


def _scored(reqs: Sequence[EditRequest]) -> list[tuple[int, str, str]]:
    """(request index, metric prefix, question) for reliability and generalisation."""
    return [(i, key, q) for i, r in enumerate(reqs)
            for key, q in (("rewrite", r.prompt), ("rephrase", r.rephrase)) if q]


def _by_request(n: int, pairs: Iterable[tuple[int, Any]]) -> list[list[Any]]:
    grouped: list[list[Any]] = [[] for _ in range(n)]
    for i, value in pairs:
        grouped[i].append(value)
    return grouped


def _evaluate_wild(model, params, reqs, rc, judge, pre, states=None, keep_states=False) -> list[dict]:
    scored = _scored(reqs)
    locs = [(i, p.prompt) for i, r in enumerate(reqs) for p in r.locality]
    # One generation call for every question of these requests (scored and locality): the jitted
    # loop runs on the device, the WILD stop rule is checked on the decoded text on the host. With an
    # edit stack, request i is answered by member i (`members`; ignored for plain params).
    answers = wild.wild_answers(params, model.cfg, model.tokenizer,
                                [q for *_, q in scored] + [q for _, q in locs], rc.wild,
                                members=[i for i, *_ in scored] + [i for i, _ in locs], token_texts=model.token_texts,
                                states=states, keep_states=keep_states)
    out = [dict() for _ in reqs]
    for (i, key, _), a in zip(scored, answers):
        out[i].update({f"{key}_gen_content": a.answer, f"{key}_raw": a.raw})
    items = [JudgeItem(q, reqs[i].target_new, a.answer) for (i, _, q), a in zip(scored, answers)]
    # One grader: process 0 asks the judge (one API bill, one local judge model) and every process
    # records its verdicts; a judge is not a collective, so the others need not run it.
    verdicts = distributed.broadcast_json(judge.judge_many(items) if distributed.is_writer() else None)
    for (i, key, _), verdict in zip(scored, verdicts):
        out[i][f"{key}_acc"] = verdict
    loc_answers = _by_request(len(reqs), zip((i for i, _ in locs), answers[len(scored):]))
    for i, loc in enumerate(loc_answers):
        out[i]["_loc"] = [dataclasses.asdict(a) for a in loc]
        if pre is not None:
            before = [wild.WildAnswer(tuple(a["ids"]), a["raw"], a["answer"]) for a in pre[i]["wild"]["_loc"]]
            same = [wild.locality_same_generation(b, a) for b, a in zip(before, loc)]
            same_ans = [wild.locality_same_answer(b, a) for b, a in zip(before, loc)]
            out[i]["locality"] = {"neighborhood_acc": _mean(same), "answer_acc": _mean(same_ans),
                                  "per_pair": same, "gen_content": [a.answer for a in loc]}
    return out


def _evaluate_synthetic(model, params, reqs, rc, pre, states=None, keep_states=False) -> list[dict]:
    cfg, tok = model.cfg, model.tokenizer
    scored = _scored(reqs)
    kind = "chat_temp" if rc.synthetic_chat else "question-only"
    wrap = lambda qs: [wrap_context(q, kind, tok).text for q in qs]  # noqa: E731
    special = not rc.synthetic_chat  # a chat-wrapped prompt holds its special tokens as text
    pairs = [(i, p) for i, r in enumerate(reqs) for p in r.locality]
    # One teacher-forced pass for the scored questions and the locality prompts together: a single
    # edit's ~2 + ~5 rows fill one batch of 8 (two calls were two forwards and two compiled shapes).
    both = synthetic.predicted_target_tokens(
        params, cfg, tok, wrap([q for *_, q in scored] + [p.prompt for _, p in pairs]),
        [reqs[i].target_new for i, *_ in scored] + [p.answer for _, p in pairs], add_special_tokens=special,
        members=[i for i, *_ in scored] + [i for i, _ in pairs], states=states, keep_states=keep_states)
    out = [dict() for _ in reqs]
    for (i, key, _), (pred, gold) in zip(scored, both):
        out[i][f"{key}_acc"] = synthetic.accuracy(pred, gold)
    preds = both[len(scored):]
    for i, loc in enumerate(_by_request(len(reqs), ((i, pred.tolist()) for (i, _), (pred, _) in zip(pairs, preds)))):
        out[i]["_loc"] = loc
        if pre is not None:
            agree = synthetic.locality_agreement(pre[i]["synthetic"]["_loc"], loc)
            out[i]["locality"] = {"neighborhood_acc": _mean(agree), "per_pair": agree}
    if not rc.generated_synthetic:
        return out
    # The seed's GRACE variant (spec 2.2): greedy generation of |target| tokens, position-wise
    # accuracy and macro-F1 (`*_generated`), beside the teacher-forced scores. Only where asked (the
    # method's `generated_synthetic`, or the RunConfig field): it costs one generation per question.
    gen = synthetic.generated_target_tokens(params, cfg, tok, [q for *_, q in scored] + [p.prompt for _, p in pairs],
                                            [reqs[i].target_new for i, *_ in scored] + [p.answer for _, p in pairs],
                                            members=[i for i, *_ in scored] + [i for i, _ in pairs])
    for (i, key, _), (ids, gold) in zip(scored, gen):
        out[i][f"{key}_acc_generated"] = float((ids == gold).mean())
        out[i][f"{key}_F1_generated"] = synthetic.macro_f1(gold, ids)
    loc_gen = ((i, ids.tolist()) for (i, _), (ids, _) in zip(pairs, gen[len(scored):]))
    for i, loc in enumerate(_by_request(len(reqs), loc_gen)):
        out[i]["_loc_generated"] = loc
        before = pre[i]["synthetic"].get("_loc_generated") if pre is not None else None
        if before is not None:  # absent in a pre-edit cache written before this variant existed
            agree = synthetic.locality_agreement(before, loc)
            out[i]["locality"]["neighborhood_acc_generated"] = _mean(agree)
    return out


def evaluate(model: Any, params: Any, reqs: Sequence[EditRequest], rc: RunConfig, judge: Judge,
             pre: Sequence[dict] | None = None, states: PromptStates | None = None,
             keep_states: bool = False) -> list[dict]:
    """Metrics of each request on `params`, per evaluation type; with `pre` (the pre-edit
    metrics of the same requests), locality against the pre-edit outputs. `params` may be an
    `EditStack` with one member per request: request i is then evaluated on member i. `states`:
    the prompts' lower layers (WILD prefill, teacher-forced rows), kept (`keep_states`, on the
    unedited model) or used (`generate.PromptStates`)."""
    out = [dict() for _ in reqs]
    if "wild" in rc.kinds:
        for o, w in zip(out, _evaluate_wild(model, params, reqs, rc, judge, pre, states, keep_states)):
            o["wild"] = w
    if "synthetic" in rc.kinds:
        for o, s in zip(out, _evaluate_synthetic(model, params, reqs, rc, pre, states, keep_states)):
            o["synthetic"] = s
    return out


def evaluate_singles(model: Any, reqs: Sequence[EditRequest], edited: Sequence[tuple[Any, dict]], rc: RunConfig,
                     judge: Judge, pre: dict[int, dict], stack_size: int | None = None,
                     states: PromptStates | None = None) -> list[dict]:
    """Post-edit metrics of single edits: request i on its own edited params ``edited[i] = (params,
    info)``, {} where the edit failed. Edits that changed the same leaves go through `evaluate`
    together (at most `stack_size` at a time) as one `EditStack`, which gives each its own model in
    one batched pass."""
    ok = [i for i, (_, info) in enumerate(edited) if "error" not in info]
    posts: list[dict] = [{} for _ in reqs]
    # A stack's changed leaves may take up to 1/8 of the model's bytes: a 7B MEMIT stack then holds 3
    # edits, a ROME one 16, and a GPU that fits the model fits its stacks.
    for members, params in stack.stacks(model.params, [edited[i][0] for i in ok],
                                        max_bytes=stack.nbytes(model.params) // 8, max_members=stack_size):
        idx = [ok[j] for j in members]
        for i, post in zip(idx, evaluate(model, params, [reqs[i] for i in idx], rc, judge,
                                         [pre[reqs[i].case_id] for i in idx], states)):
            posts[i] = post
    return posts


def _unchanged_below(model: Any, edited: Sequence[tuple[Any, dict]], rc: RunConfig) -> PromptStates | None:
    """Where a group's pre-edit pass keeps its prompts' lower layers for the post-edit pass (WILD
    prefill, teacher-forced rows): the lowest layer the group's edits change (`stack.lowest_layer`)
    -- None where that is layer 0, or with adapters (GRACE / WISE: their stacks run unpacked).

    Why the pre-edit pass runs per group, after the group's edits: that is when the layer is known,
    and the kept states (~0.6 MB a question on the default model) live for one group only."""
    ok = [params for params, info in edited if "error" not in info]
    if not ok or any(has_adapters(params) for params in ok):
        return None
    paths = [path_steps(p) for params in ok for p in changed_leaves(model.params, params)]
    layer = min(stack.lowest_layer(paths, model.cfg.num_layers), model.cfg.num_layers - 1)  # a head edit: the last
    return PromptStates(layer) if layer > 0 else None


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _public(metrics: dict) -> dict:
    """Drop internal fields (leading underscore) before writing results."""
    return {k: (_public(v) if isinstance(v, dict) else v) for k, v in metrics.items() if not k.startswith("_")}


# --- streaming files ----------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    """Lines of a results file, as process 0 reads them (`_read_jsonl_here`), on every process: in a
    multi-host run the processes must agree on what is finished, whatever their own disks hold."""
    return distributed.broadcast_json(_read_jsonl_here(path) if distributed.is_writer() else None)


def _exists(path: Path) -> bool:
    """Whether `path` exists for process 0 (the writer), on every process."""
    return distributed.broadcast_json(path.exists() if distributed.is_writer() else None)


def _read_jsonl_here(path: Path) -> list[dict]:
    """Lines of a results file. A torn line (the run was killed while writing it) is dropped
    and the file rewritten without it, so that appending goes on from a clean line end."""
    if not path.exists():
        return []
    rows, torn = [], False
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True
    if torn:
        log.warning("%s: dropped a torn line (the run was killed while writing it)", path)
        io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _append(path: Path, row: dict) -> None:
    io.append_line(path, json.dumps(row, ensure_ascii=False))


def _fingerprint(model: Any) -> str:
    leaf = np.asarray(jax.device_get(model.params["final_norm"]["scale"]), np.float32)
    return f"{model.name}:{model.cfg.num_layers}:{float(leaf.sum()):.6f}"


def pre_cache_path(model: Any, rc: RunConfig, judge: Judge) -> Path:
    key = json.dumps([_fingerprint(model), rc.data_path, rc.dataset, rc.kinds, dataclasses.asdict(rc.wild),
                      judge.name] + (["synthetic_chat"] if rc.synthetic_chat and "synthetic" in rc.kinds else []),
                     sort_keys=True)  # (the last only when set: caches written before it keep their key)
    return Path(rc.output_dir) / ".pre_cache" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".jsonl")


def pre_edit(model: Any, reqs: Sequence[EditRequest], rc: RunConfig, judge: Judge,
             states: PromptStates | None = None) -> dict[int, dict]:
    """Pre-edit metrics of every request, from the cache where present, computed in batches (keeping
    the prompts' lower layers in `states`)."""
    path = pre_cache_path(model, rc, judge)
    done = {row["case_id"]: row["metrics"] for row in _read_jsonl(path)}
    todo = [r for r in reqs if r.case_id not in done]
    for s in tqdm(range(0, len(todo), rc.eval_batch), desc="pre-edit eval", disable=not todo):
        chunk = todo[s : s + rc.eval_batch]
        for r, m in zip(chunk, evaluate(model, model.params, chunk, rc, judge, states=states, keep_states=True)):
            done[r.case_id] = m
            _append(path, {"case_id": r.case_id, "metrics": m})
    return done


# --- the experiment -----------------------------------------------------------------------------


def _record(r: EditRequest, pre: dict, post: dict, info: dict) -> dict:
    return {"case_id": r.case_id, "requested_rewrite": dataclasses.asdict(r), "pre": _public(pre),
            "post": _public(post), "edit": info}


def _given(ctx: dict) -> dict:
    """The context a method's `apply` gets: only what is set (methods take what they need)."""
    return {k: v for k, v in ctx.items() if v is not None}


def _safe_edit(method: EditMethod, model: Any, params: Any, reqs: Sequence[EditRequest], hp: Any,
               **ctx: Any):
    """Apply one edit; a bad request becomes an error record instead of ending the run.
    `ctx` (stats, state, what `method.prepare` gave) is passed on where set."""
    t0 = time.perf_counter()
    try:
        new, info = method.apply(params, model.cfg, model.tokenizer, reqs, hp,
                                 **_given(ctx))
    except ValueError as err:  # method-level input errors (subject missing, empty target...)
        ids = ", ".join(str(r.case_id) for r in reqs)
        log.warning("case %s: edit failed, skipped: %s", ids, err)
        return params, {"error": str(err).splitlines()[0]}
    jax.block_until_ready(new)
    info = dict(info, seconds=round(time.perf_counter() - t0, 4))
    return new, info


EDIT_GROUP = 16  # single mode: requests edited together (`apply_each`) and, by default, evaluated together


def _safe_edits(method: EditMethod, model: Any, reqs: Sequence[EditRequest], hp: Any,
                **ctx: Any) -> list[tuple[Any, dict]]:
    """Single edits of `reqs`, each from the original params: together where the method can
    (`apply_each`; `info["seconds"]` is then the group's time per request), else one by one. A
    request the method rejects sends the group through `_safe_edit` one by one, which records it."""
    if method.apply_each is None or len(reqs) == 1:
        return [_safe_edit(method, model, model.params, [r], hp, **ctx) for r in reqs]
    t0 = time.perf_counter()
    try:
        edited = method.apply_each(model.params, model.cfg, model.tokenizer, reqs, hp,
                                   **_given(ctx))
    except ValueError:
        return [_safe_edit(method, model, model.params, [r], hp, **ctx) for r in reqs]
    jax.block_until_ready([p for p, _ in edited])
    seconds = round((time.perf_counter() - t0) / len(reqs), 4)
    return [(p, dict(info, seconds=seconds)) for p, info in edited]


def _sequence_key(model: Any, method: EditMethod, hp: Any, rc: RunConfig, requests: Sequence[EditRequest]) -> str:
    """What a sequence checkpoint must agree with to be continued: the method and its settings, the
    model, the edit mode and the requests in their order."""
    hp_json = json.dumps(dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else repr(hp), default=str,
                         sort_keys=True)
    key = json.dumps([method.name, hp_json, _fingerprint(model), rc.edit_mode, rc.batch_size,
                      [r.case_id for r in requests]])
    return hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass
class Checkpointing:
    """When and where a sequence writes its checkpoints, and how a resumed run reads one."""

    path: Path
    key: str
    every: int

    def resume(self, base: Any, step: int, missing: Sequence[int]) -> edit_checkpoint.SequenceState | None:
        """The last checkpoint, or None to replay from the start: there is none, checkpoints are off,
        or a curve point still to evaluate lies before it (only a replay reproduces those params)."""
        if self.every <= 0:
            return None
        try:
            seq = edit_checkpoint.load(self.path, self.key, base)
        except edit_checkpoint.CheckpointError as err:
            raise RunError(str(err)) from None
        if seq is not None and any(n <= seq.n_chunks * step for n in missing):
            log.warning("%s: a curve point to evaluate precedes it; replaying the sequence from the start", self.path)
            return None
        if seq is not None:
            log.info("resuming the sequence after edit call %d from %s", seq.n_chunks, self.path)
        return seq

    def after(self, base: Any, seq: edit_checkpoint.SequenceState, n_edited: int, size: int, last: bool) -> None:
        """Write `seq` when this edit call crossed a multiple of `every` edits, and after the last.
        A checkpoint that cannot be written is a warning and turns checkpoints off: the run goes on."""
        if self.every <= 0 or not (last or n_edited // self.every > (n_edited - size) // self.every):
            return
        error = None
        try:
            edit_checkpoint.save(self.path, self.key, base, seq)
        except (edit_checkpoint.CheckpointError, OSError) as err:
            error = str(err)
        # Process 0 alone writes (and may fail to): every process must turn checkpoints off together,
        # or the others would wait in the next checkpoint's gather forever.
        error = distributed.broadcast_json(error)
        if error:
            log.warning("sequence checkpoint not written, checkpoints off for this run: %s", error)
            self.every = 0


def curve_point(model: Any, params: Any, edited: Sequence[EditRequest], rc: RunConfig, judge: Judge,
                pre: dict[int, dict], infos: dict[int, dict], n_edits: int) -> dict:
    """Every request edited so far, evaluated on the current params: the same evaluation and the
    same means as the final post-edit block (`summarise`), per evaluation type."""
    ok = [r for r in edited if "error" not in infos[r.case_id]]
    rows = []
    for s in range(0, len(ok), rc.eval_batch):
        chunk = ok[s : s + rc.eval_batch]
        posts = evaluate(model, params, chunk, rc, judge, [pre[r.case_id] for r in chunk])
        rows += [_record(r, pre[r.case_id], post, infos[r.case_id]) for r, post in zip(chunk, posts)]
    post = summarise(rows, rc, judge.name)["post"]
    return {"n_edits": n_edits, **{kind: post[kind] for kind in rc.kinds}}


def run(model: Any, requests: Sequence[EditRequest], method: EditMethod, hp: Any, rc: RunConfig,
        judge: Judge, stats: Any = None) -> dict:
    """Run the experiment, streaming results; returns the summary (also written to disk).

    `stats`: key statistics for the methods that need them. In sequential / batch mode a
    method's `info["state"]` is handed to its next edit (AlphaEdit's accumulated keys)."""
    if rc.edit_mode == "batch" and not method.batchable:
        raise RunError(f"method {method.name} cannot batch-edit; use --edit_mode=single or sequential")
    out_dir = Path(rc.output_dir)
    io.makedirs(out_dir)
    if method.generated_synthetic and not rc.generated_synthetic:
        rc = dataclasses.replace(rc, generated_synthetic=True)
    if getattr(hp, "use_chat_template", False) and not rc.synthetic_chat:
        rc = dataclasses.replace(rc, synthetic_chat=True)
    results = out_dir / f"{rc.run_name}.jsonl"
    if not rc.resume and _exists(results):
        raise RunError(f"{results} exists; pass --resume to continue it or choose another --output_dir")
    curve_file = out_dir / f"{rc.run_name}_curve.jsonl"
    if rc.eval_at and not rc.resume and _exists(curve_file):
        raise RunError(f"{curve_file} exists; pass --resume to continue it or choose another --output_dir")
    if rc.eval_at and rc.eval_at[-1] > len(requests):
        raise RunError(f"eval_at point {rc.eval_at[-1]} exceeds the {len(requests)} requests")
    curve = {row["n_edits"]: row for row in _read_jsonl(curve_file)} if rc.eval_at else {}
    # Points before the last edit are evaluated while editing; the one at the end is the final summary.
    missing = [n for n in rc.eval_at if n not in curve and n < len(requests)]
    finished = {row["case_id"] for row in _read_jsonl(results)}
    todo = [r for r in requests if r.case_id not in finished]
    # Single edits: each group's pre-edit pass right before its post-edit one (`_unchanged_below`).
    pre = {} if rc.edit_mode == "single" else pre_edit(model, requests, rc, judge)
    # Run constants from the unedited model (context templates, a MEND archive): once, not per edit.
    ctx = method.prepare(model.params, model.cfg, model.tokenizer, hp) if todo or missing else {}
    if rc.edit_mode == "single":
        # Each edited pytree is an ordinary (traced) argument of the jitted generation and forward
        # programs, so evaluating a new edit compiles nothing; only a question in an unseen bucket does.
        # `stack_edits` edits at a time, each from the original model, are evaluated in one pass.
        k = rc.stack_edits or EDIT_GROUP
        k = 1 if sharding.mesh_of(model.params) is not None else k
        # A method that edits several requests together (`apply_each`) gets EDIT_GROUP at a time
        # even where each edited model is then evaluated alone (k = 1): rows are written per group.
        g = max(k, EDIT_GROUP) if method.apply_each is not None else k
        bar = tqdm(total=len(todo), desc=f"{method.name} single")
        for s in range(0, len(todo), g):
            group = todo[s : s + g]
            edited = _safe_edits(method, model, group, hp, stats=stats, **ctx)
            for _, info in edited:
                info.pop("state", None)
            states = _unchanged_below(model, edited, rc)
            pre.update(pre_edit(model, group, rc, judge, states))
            posts = evaluate_singles(model, group, edited, rc, judge, pre, k, states)
            for r, (_, info), post in zip(group, edited, posts):
                _append(results, _record(r, pre[r.case_id], post, info))
            bar.update(len(group))
        bar.close()
    elif todo or missing:
        step = 1 if rc.edit_mode == "sequential" else rc.batch_size
        chunks = [requests[s : s + step] for s in range(0, len(requests), step)]
        ckpt = Checkpointing(out_dir / f"{rc.run_name}_sequence.npz", _sequence_key(model, method, hp, rc, requests),
                             rc.checkpoint_every)
        seq = ckpt.resume(model.params, step, missing) if rc.resume else None
        seq = seq or edit_checkpoint.SequenceState(0, model.params, None, {})
        params, state, infos = seq.params, seq.state, dict(seq.infos)
        for k in tqdm(range(seq.n_chunks, len(chunks)), desc=f"{method.name} {rc.edit_mode} edits",
                      initial=seq.n_chunks, total=len(chunks)):
            chunk = chunks[k]
            params, info = _safe_edit(method, model, params, chunk, hp, stats=stats, state=state, **ctx)
            state = info.pop("state", state)
            infos.update({r.case_id: info for r in chunk})
            n_edited = k * step + len(chunk)
            if n_edited in missing:
                curve[n_edited] = curve_point(model, params, requests[:n_edited], rc, judge, pre, infos, n_edited)
                _append(curve_file, curve[n_edited])
            ckpt.after(model.params, edit_checkpoint.SequenceState(k + 1, params, state, infos), n_edited,
                       len(chunk), last=k == len(chunks) - 1)
        for s in tqdm(range(0, len(todo), rc.eval_batch), desc="post-edit eval"):
            chunk = todo[s : s + rc.eval_batch]
            posts = evaluate(model, params, chunk, rc, judge, [pre[r.case_id] for r in chunk])
            for r, post in zip(chunk, posts):
                _append(results, _record(r, pre[r.case_id], post, infos[r.case_id]))
    summary = summarise(_read_jsonl(results), rc, judge.name)
    if rc.eval_at:
        n = len(requests)
        if n in rc.eval_at and n not in curve:
            curve[n] = {"n_edits": n, **{kind: summary["post"][kind] for kind in rc.kinds}}
            _append(curve_file, curve[n])
        summary["curve"] = [curve[n] for n in rc.eval_at if n in curve]
    write_summary(out_dir, summary)
    return summary


def write_summary(out_dir: Path, summary: dict) -> list[Path]:
    """`<run>_summary.json` and `<run>_table.md` into `out_dir` (also `mirage_jax.regrade`'s writer)."""
    paths = [out_dir / f"{summary['run']}_summary.json", out_dir / f"{summary['run']}_table.md"]
    io.write_json(paths[0], summary, indent=2)
    io.write_text(paths[1], markdown_table(summary))
    return paths


def summarise(rows: Sequence[dict], rc: RunConfig, judge_name: str) -> dict:
    """Means over samples per stage and evaluation type; None (unjudged) values are counted apart.

    `post`/`pre` also carry flat `rewrite_acc`, `rephrase_acc`, `locality` of the headline
    evaluation (WILD when it ran), beside the per-type blocks.
    """
    ok = [r for r in rows if "error" not in r.get("edit", {})]
    summary: dict[str, Any] = {"schema": SUMMARY_SCHEMA, "run": rc.run_name, "method": rc.method,
                               "model": rc.model_name, "dataset": rc.dataset, "edit_mode": rc.edit_mode,
                               "judge": judge_name, "n_samples": len(ok), "n_failed_edits": len(rows) - len(ok)}
    if rc.synthetic_chat and "synthetic" in rc.kinds:
        summary["synthetic_prompts"] = "chat_template"  # the seed's use_chat_template (spec 2.1 step 1)
    for stage in ("pre", "post"):
        block: dict[str, Any] = {}
        for kind in rc.kinds:
            vals = [r[stage].get(kind, {}) for r in ok]
            m = {key: _mean(v.get(key) for v in vals) for key in ("rewrite_acc", "rephrase_acc")}
            if kind == "synthetic" and rc.generated_synthetic:  # the seed's generated variant (spec 2.2), apart
                m.update({key: _mean(v.get(key) for v in vals) for key in ("rewrite_acc_generated",
                                                                             "rephrase_acc_generated")})
            if kind == "wild":  # answers the judge could not grade (unreachable LLM judge)
                m["unjudged"] = sum(v.get(k) is None for v in vals for k in ("rewrite_acc", "rephrase_acc")
                                    if k.replace("acc", "gen_content") in v)
            if stage == "post":
                m["locality"] = _mean(v.get("locality", {}).get("neighborhood_acc") for v in vals)
                if kind == "synthetic" and rc.generated_synthetic:
                    m["locality_generated"] = _mean(v.get("locality", {}).get("neighborhood_acc_generated")
                                                    for v in vals)
                if kind == "wild":
                    m["locality_answer"] = _mean(v.get("locality", {}).get("answer_acc") for v in vals)
            block[kind] = m
        head = block[rc.kinds[0]]
        block.update({k: head[k] for k in ("rewrite_acc", "rephrase_acc", "locality") if k in head})
        summary[stage] = block
    return summary


def markdown_table(summary: dict) -> str:
    """One row like the paper's table: synthetic vs WILD side by side (post-edit)."""
    def cell(kind, key):
        v = summary["post"].get(kind, {}).get(key)
        return "-" if v is None else f"{v:.3f}"

    head = "| Method | Model | Dataset | Mode | Rel syn | Rel WILD | Gen syn | Gen WILD | Loc syn | Loc WILD |"
    sep = "|" + "---|" * 10
    row = (f"| {summary['method']} | {summary['model']} | {summary['dataset']} | {summary['edit_mode']} | "
           f"{cell('synthetic', 'rewrite_acc')} | {cell('wild', 'rewrite_acc')} | "
           f"{cell('synthetic', 'rephrase_acc')} | "
           f"{cell('wild', 'rephrase_acc')} | {cell('synthetic', 'locality')} | {cell('wild', 'locality')} |")
    return "\n".join([head, sep, row, "", f"n={summary['n_samples']}, judge={summary['judge']}", ""])
