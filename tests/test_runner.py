"""The experiment runner end to end: files, resume after a crash, the default-model FT-M run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import datasets, runner
from mirage_jax.datasets import EditRequest
from mirage_jax.editing import METHODS, EditMethod
from mirage_jax.editing.ft import FTConfig
from mirage_jax.evaluation import wild
from mirage_jax.evaluation.answers import normalize_answer
from mirage_jax.evaluation.judge import ExactMatchJudge
from mirage_jax.evaluation.wild import WildConfig
from mirage_jax.model import load_model
from mirage_jax.runner import EDIT_MODES, RunConfig, RunError, run
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


class _Killed(RuntimeError):
    """Stands for the process dying mid-run (not a ValueError, so no record-level handling)."""


def _tiny_records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        a, b = 10 + 3 * i, 11 + 3 * i
        recs.append({"prompt": f"t{a} t{b} t5", "subject": f"t{b}", "target": f"t{40 + i} t{41 + i}",
                     "rephrase": f"t{b} t{a} t6",
                     # the first locality prompt mentions the subject (an edit of it may move that
                     # answer), the second, shared by all records, does not
                     "locality": [{"loc": f"t{b} t{90 + i}", "loc_ans": "t8"}, {"loc": "t99 t98", "loc_ans": "t97"}]})
    return recs


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    model = load_model(save_tiny("llama", d / "ckpt", seed=5))
    data = d / "edits.json"
    data.write_text(json.dumps(_tiny_records(5)))
    return model, data


def _rc(data, out, **kw):
    base = {"method": "FT-M", "model_name": "tiny", "dataset": "qaedit", "data_path": str(data), "evaluation": "both",
            "wild": WildConfig(max_new_tokens=6), "output_dir": str(out)}
    return RunConfig(**{**base, **kw})


def test_single_run_streams_one_line_per_sample_and_summarises(tiny_setup, tmp_path):
    model, data = tiny_setup
    reqs = list(datasets.load_qaedit(data).requests)
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=30)
    summary = run(model, reqs, METHODS["FT-M"], hp, _rc(data, tmp_path), ExactMatchJudge())
    rows = [json.loads(x) for x in (tmp_path / f"{_rc(data, tmp_path).run_name}.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == list(range(5))
    post = rows[0]["post"]
    assert set(post) == {"wild", "synthetic"}
    assert {"rewrite_acc", "rephrase_acc", "rewrite_gen_content", "rephrase_gen_content",
            "locality"} <= set(post["wild"])
    assert len(post["wild"]["locality"]["per_pair"]) == 2  # every locality pair, not only the first
    assert summary["post"]["synthetic"]["rewrite_acc"] >= 0.9  # the tiny model learns the edit
    assert summary["post"]["rewrite_acc"] == summary["post"]["wild"]["rewrite_acc"]
    assert (tmp_path / f"{_rc(data, tmp_path).run_name}_table.md").read_text().startswith("| Method")
    with pytest.raises(RunError, match="--resume"):  # never overwrite finished work silently
        run(model, reqs, METHODS["FT-M"], hp, _rc(data, tmp_path), ExactMatchJudge())


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_resume_after_a_crash_finishes_each_sample_once(tiny_setup, tmp_path, mode):
    model, data = tiny_setup
    reqs = list(datasets.load_qaedit(data).requests)
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=5)
    calls, crash = [], [mode == "single"]

    def crashing(params, cfg, tok, rs, hp):
        calls.append([r.case_id for r in rs])
        if len(calls) == 3 and crash[0]:
            raise _Killed  # the process dies mid-run
        return METHODS["FT-M"].apply(params, cfg, tok, rs, hp)

    method = EditMethod("FT-M", FTConfig, crashing, batchable=True)
    # single: edits 0-1 are evaluated together and written, then the process dies at edit 2
    rc = _rc(data, tmp_path, edit_mode=mode, batch_size=2, evaluation="wild", stack_edits=2)
    results = tmp_path / f"{rc.run_name}.jsonl"
    if mode == "single":
        with pytest.raises(_Killed):
            run(model, reqs, method, hp, rc, ExactMatchJudge())
        assert len(results.read_text().splitlines()) == 2
    else:  # batch: the evaluation writes lines; simulate a kill after two lines, torn third line
        run(model, reqs, method, hp, rc, ExactMatchJudge())
        lines = results.read_text().splitlines()
        results.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    calls.clear()
    crash[0] = False
    resumed = RunConfig(**{**rc.__dict__, "resume": True})
    summary = run(model, reqs, method, hp, resumed, ExactMatchJudge())
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert sorted(r["case_id"] for r in rows) == list(range(5))
    assert summary["n_samples"] == 5
    if mode == "single":
        assert calls == [[2], [3], [4]]  # finished samples are not edited again


# --- tests that pin values, not shapes ------------------------------------------------------------
# Two deterministic stand-in edits keep these tests about the runner, not about a method: each
# provably changes what the model generates, in a way a test can predict without the runner.


@pytest.fixture(scope="module")
def wild_setup(tiny_setup):
    """The tiny model with "t127" as its only EOS. Its own EOS texts "t1" / "t2" are prefixes of
    other tokens' texts ("t12", "t24"), so the text-level stop rule would end most answers after
    one token -- too little generation for these tests to see an edit in."""
    model, data = tiny_setup
    return dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, eos_token_ids=(127,))), data


def _noise(case_id: int, shape: Sequence[int], scale: float) -> jax.Array:
    return scale * jax.random.normal(jax.random.PRNGKey(case_id), tuple(shape))


def _subject_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hp: Any, **ctx):
    """Throw each request's subject embedding far off: exactly the prompts (and generations) that
    contain the subject token change, so some locality answers move and others provably stay."""
    emb = params["embed"]["embedding"]
    for r in requests:
        for t in tokenizer(r.subject, add_special_tokens=False)["input_ids"]:
            emb = emb.at[t].add(_noise(r.case_id, emb.shape[1:], 1.0))
    return {**params, "embed": {**params["embed"], "embedding": emb}}, {}


def _drift_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hp: Any, **ctx):
    """Nudge the whole unembedding by noise keyed by case id: every generation after it depends
    on every edit applied before it, so a missing edit shows in every later row."""
    kernel = params["lm_head"]["kernel"]
    for r in requests:
        kernel = kernel + _noise(r.case_id, kernel.shape, 0.01)
    return {**params, "lm_head": {**params["lm_head"], "kernel": kernel}}, {}


SUBJECT_EDIT = EditMethod("subject-noise", dict, _subject_edit, batchable=True)
DRIFT_EDIT = EditMethod("drift", dict, _drift_edit, batchable=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _results_path(rc: RunConfig) -> Path:
    return Path(rc.output_dir) / f"{rc.run_name}.jsonl"


@pytest.mark.parametrize("mode", EDIT_MODES)
def test_post_edit_wild_records_are_generations_of_the_edited_weights(wild_setup, tmp_path, mode):
    """Every post-edit WILD field equals what the edited weights generate, computed here without
    the runner, and the WILD locality is the fraction of locality generations left unchanged.

    Planted bugs this catches (each passed every earlier test): post-edit WILD scoring on the
    unedited weights (`_evaluate_wild(model, model.params, ...)` in `evaluate`); WILD locality
    fixed at 1.0 (`same = [1.0 for _ in loc]`).
    """
    model, data = wild_setup
    reqs = list(datasets.load_qaedit(data).requests)
    rc = _rc(data, tmp_path, edit_mode=mode, batch_size=2, evaluation="wild")
    summary = run(model, reqs, SUBJECT_EDIT, None, rc, ExactMatchJudge())
    rows = _rows(_results_path(rc))

    def edited(rs: Sequence[EditRequest]) -> Any:
        return _subject_edit(model.params, model.cfg, model.tokenizer, rs, None)[0]

    all_edits = edited(reqs)
    unchanged = []
    for r, row in zip(reqs, rows, strict=True):
        params = edited([r]) if mode == "single" else all_edits
        questions = [r.prompt, r.rephrase] + [p.prompt for p in r.locality]
        pre = wild.wild_answers(model.params, model.cfg, model.tokenizer, questions, rc.wild)
        post = wild.wild_answers(params, model.cfg, model.tokenizer, questions, rc.wild)
        assert post[0].ids != pre[0].ids  # the premise: this edit moves the edited answer
        for stage, answers in (("pre", pre), ("post", post)):
            got = row[stage]["wild"]
            assert [got["rewrite_raw"], got["rephrase_raw"]] == [a.raw for a in answers[:2]], (stage, r.case_id)
            assert [got["rewrite_gen_content"], got["rephrase_gen_content"]] == [a.answer for a in answers[:2]]
        same = [float(b.ids == a.ids) for b, a in zip(pre[2:], post[2:])]
        same_answer = [normalize_answer(b.answer) == normalize_answer(a.answer) for b, a in zip(pre[2:], post[2:])]
        loc = row["post"]["wild"]["locality"]
        assert loc == {"per_pair": same, "neighborhood_acc": np.mean(same), "answer_acc": np.mean(same_answer),
                       "gen_content": [a.answer for a in post[2:]]}, r.case_id
        unchanged += same
    assert 0.0 in unchanged and 1.0 in unchanged  # the premise: some locality answers move, some stay
    assert summary["post"]["wild"]["locality"] == pytest.approx(
        np.mean([row["post"]["wild"]["locality"]["neighborhood_acc"] for row in rows]))
    assert summary["post"]["wild"]["locality"] < 1.0


def _dies_writing_line(results: Path, line: int, append: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    """`runner._append` for a process killed while writing results line `line` (0-based): the
    lines before it are whole, that one is left torn, nothing after it is written."""

    def dying(path: Path, row: dict) -> None:
        if path == results and path.exists() and len(path.read_text().splitlines()) == line:
            with path.open("a") as f:
                f.write(json.dumps(row)[:40])
            raise _Killed
        append(path, row)

    return dying


def _comparable(rows: Sequence[dict]) -> list[dict]:
    """Rows without the edit's wall time, the one field two runs of the same work may differ in."""
    return [{**r, "edit": {k: v for k, v in r["edit"].items() if k != "seconds"}} for r in rows]


@pytest.mark.parametrize("mode", EDIT_MODES)
def test_resumed_run_equals_uninterrupted_run_value_for_value(wild_setup, tmp_path, monkeypatch, mode):
    """A run killed while writing its third line (a torn half line left behind), then resumed,
    writes the same rows, value for value, as a run never interrupted.

    Planted bugs this catches: sequential / batch resume that skips re-applying the finished
    requests' edits (`chunks` built from `todo` instead of `requests`: the later rows are then
    evaluated without the earlier edits); a resume that keeps the torn line (the next row is
    glued to it and lost).
    """
    model, data = wild_setup
    reqs = list(datasets.load_qaedit(data).requests)
    kw = {"edit_mode": mode, "batch_size": 2, "evaluation": "both", "eval_batch": 2}
    whole = _rc(data, tmp_path / "whole", **kw)
    run(model, reqs, DRIFT_EDIT, None, whole, ExactMatchJudge())
    killed = _rc(data, tmp_path / "killed", **kw)
    results = _results_path(killed)
    with monkeypatch.context() as m:
        m.setattr(runner, "_append", _dies_writing_line(results, 2, runner._append))
        with pytest.raises(_Killed):
            run(model, reqs, DRIFT_EDIT, None, killed, ExactMatchJudge())
    lines = results.read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines[:2]] == [0, 1] and len(lines) == 3  # two whole, one torn
    summary = run(model, reqs, DRIFT_EDIT, None, dataclasses.replace(killed, resume=True), ExactMatchJudge())
    want, got = _comparable(_rows(_results_path(whole))), _comparable(_rows(results))
    assert [r["case_id"] for r in got] == [r["case_id"] for r in want] == list(range(5))
    for g, w in zip(got, want):
        assert g == w, f"case {w['case_id']}: the resumed run differs from the uninterrupted one"
    assert summary == json.loads((Path(whole.output_dir) / f"{whole.run_name}_summary.json").read_text())
    # the premise: the edits change the generations that are compared
    assert want[2]["post"]["wild"]["rewrite_raw"] != want[2]["pre"]["wild"]["rewrite_raw"]


def _carry_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hp: Any, state=None, **ctx):
    """`_drift_edit` whose nudge grows with a count carried in the method state (as AlphaEdit carries
    its keys): a resumed sequence that loses the state writes different rows."""
    count = (state or {}).get(3, jnp.zeros(()))
    kernel = params["lm_head"]["kernel"]
    for r in requests:
        kernel = kernel + (1.0 + count) * _noise(r.case_id, kernel.shape, 0.01)
        count = count + 1.0
    return {**params, "lm_head": {**params["lm_head"], "kernel": kernel}}, {"state": {3: count}, "n": int(count)}


CARRY_EDIT = EditMethod("carry", dict, _carry_edit, batchable=True)


def _counting(method: EditMethod, calls: list, die_at: int | None = None) -> EditMethod:
    """`method`, recording the case ids of each edit call; call number `die_at` (1-based) kills the run."""

    def apply(params, cfg, tok, rs, hp, **ctx):
        calls.append([r.case_id for r in rs])
        if len(calls) == die_at:
            raise _Killed
        return method.apply(params, cfg, tok, rs, hp, **ctx)

    return dataclasses.replace(method, apply=apply)


@pytest.mark.parametrize("mode, every, die_at, redone", [("sequential", 2, 4, [[2], [3], [4]]),
                                                         ("batch", 3, 3, [[4]])])
def test_killed_sequence_resumes_from_its_checkpoint_value_for_value(wild_setup, tmp_path, mode, every, die_at,
                                                                     redone):
    """Killed in an edit call, a run that checkpoints every `every` edits re-edits only what came
    after its last checkpoint and writes an uninterrupted run's rows, value for value; killed in
    the final evaluation, it edits nothing again. Batch chunks of 2 with `every` 3: the checkpoint
    falls after the chunk that crosses 3 edits.

    Planted bugs this catches: the method state not stored or not restored (later nudges shrink,
    rows differ); the checkpoint's params ignored on resume (the first edits are missing); the
    crossing rule as `n_edited % every == 0` (batch: no checkpoint before the kill, all redone).
    """
    model, data = wild_setup
    reqs = list(datasets.load_qaedit(data).requests)
    kw = {"edit_mode": mode, "batch_size": 2, "evaluation": "wild", "eval_batch": 2, "checkpoint_every": every}
    whole = _rc(data, tmp_path / "whole", **kw)
    run(model, reqs, CARRY_EDIT, None, whole, ExactMatchJudge())
    killed = _rc(data, tmp_path / "killed", **kw)
    calls: list = []
    with pytest.raises(_Killed):
        run(model, reqs, _counting(CARRY_EDIT, calls, die_at), None, killed, ExactMatchJudge())
    assert (Path(killed.output_dir) / f"{killed.run_name}_sequence.npz").exists()
    calls.clear()
    resumed = dataclasses.replace(killed, resume=True)
    run(model, reqs, _counting(CARRY_EDIT, calls), None, resumed, ExactMatchJudge())
    assert calls == redone
    want, got = _comparable(_rows(_results_path(whole))), _comparable(_rows(_results_path(killed)))
    assert got == want
    # killed while writing the third result line: the last checkpoint holds every edit
    again = _rc(data, tmp_path / "again", **kw)
    results = _results_path(again)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runner, "_append", _dies_writing_line(results, 2, runner._append))
        with pytest.raises(_Killed):
            run(model, reqs, CARRY_EDIT, None, again, ExactMatchJudge())
    calls.clear()
    run(model, reqs, _counting(CARRY_EDIT, calls), None, dataclasses.replace(again, resume=True), ExactMatchJudge())
    assert calls == [] and _comparable(_rows(results)) == want


def test_sequence_checkpoint_of_other_settings_or_before_a_curve_point(wild_setup, tmp_path):
    """A checkpoint written under other hyper-parameters stops the resumed run with a one-line
    error; one lying past a curve point still to evaluate is set aside and the sequence replayed."""
    model, data = wild_setup
    reqs = list(datasets.load_qaedit(data).requests)
    rc = _rc(data, tmp_path, edit_mode="sequential", evaluation="synthetic", checkpoint_every=2)
    calls: list = []
    with pytest.raises(_Killed):
        run(model, reqs, _counting(CARRY_EDIT, calls, 4), None, rc, ExactMatchJudge())
    with pytest.raises(RunError, match="other settings"):
        run(model, reqs, CARRY_EDIT, {"scale": 2}, dataclasses.replace(rc, resume=True), ExactMatchJudge())
    calls.clear()
    summary = run(model, reqs, _counting(CARRY_EDIT, calls), None, dataclasses.replace(rc, resume=True, eval_at=(1, 5)),
                  ExactMatchJudge())
    assert calls == [[i] for i in range(5)] and [p["n_edits"] for p in summary["curve"]] == [1, 5]


def test_bad_record_edit_is_reported_and_skipped(tiny_setup, tmp_path):
    model, data = tiny_setup
    reqs = list(datasets.load_qaedit(data).requests)

    def picky(params, cfg, tok, rs, hp):
        if rs[0].case_id == 1:
            raise ValueError("subject 'x' not found in prompt of record 1")
        return METHODS["FT-M"].apply(params, cfg, tok, rs, hp)

    rc = _rc(data, tmp_path, evaluation="synthetic")
    summary = run(model, reqs[:3], EditMethod("FT-M", FTConfig, picky, True), FTConfig(layers=(1,), num_steps=2),
                  rc, ExactMatchJudge())
    rows = [json.loads(x) for x in (tmp_path / f"{rc.run_name}.jsonl").read_text().splitlines()]
    assert "subject 'x' not found" in rows[1]["edit"]["error"]
    assert summary["n_samples"] == 2 and summary["n_failed_edits"] == 1


@pytest.mark.parametrize("flag, valid", [("--method=XYZ", "FT-M"), ("--dataset=squad", "counterfact"),
                                         ("--context_type=foo", "chat_temp"), ("--edit_mode=parallel", "sequential")])
def test_launch_rejects_unknown_choices_listing_the_valid_ones(flag, valid, tmp_path):
    p = subprocess.run([sys.executable, "launch.py", flag, f"--output_dir={tmp_path}", "--model=/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert valid in p.stderr and "Traceback" not in p.stderr


def test_default_model_ft_m_end_to_end(tmp_path, default_model):
    """FT-M on demo facts: synthetic reliability near 1; the WILD figure is reported, whatever it is."""
    model = default_model
    reqs = list(datasets.load_qaedit(datasets.demo_path(), ds_size=3).requests)
    rc = RunConfig(method="FT-M", model_name=model.name, dataset="qaedit", data_path=str(datasets.demo_path()),
                   evaluation="both", wild=WildConfig(context_type="chat_temp", max_new_tokens=24),
                   output_dir=str(tmp_path))
    from configs import get_hparams

    summary = run(model, reqs, METHODS["FT-M"], get_hparams("FT-M", model.name), rc, ExactMatchJudge())
    assert summary["post"]["synthetic"]["rewrite_acc"] >= 0.9
    assert summary["pre"]["synthetic"]["rewrite_acc"] < 0.5
    assert isinstance(summary["post"]["wild"]["rewrite_acc"], float)
    assert 0.0 <= summary["post"]["wild"]["locality"] <= 1.0


def test_launch_reads_the_shipped_dataset_without_data_path(tmp_path):
    """`--dataset=qaedit` alone reads data/QAEdit_inter_1k.json (the README's experiment, shrunk to
    one record, a tiny model and the synthetic evaluation)."""
    model_dir = save_tiny("llama", tmp_path / "ckpt", seed=5)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "launch.py", "--method=FT-M", f"--model={model_dir}", "--dataset=qaedit",
                        "--ds_size=1", "--evaluation=synthetic", "--hparams_for=smollm2-135m", "--hp", "layers=1",
                        "--hp", "num_steps=2", f"--output_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    [summary] = out.glob("*_summary.json")
    got = json.loads(summary.read_text())
    assert got["dataset"] == "qaedit" and got["n_samples"] == 1
    [results] = out.glob("FT-M_*_qaedit_single_synthetic_*.jsonl")
    row = json.loads(results.read_text().splitlines()[0])
    first = datasets.load_dataset("qaedit", ds_size=1).requests[0]
    assert row["requested_rewrite"]["prompt"] == first.prompt and first.target_new == "Wilt Chamberlain *"


@pytest.mark.parametrize("mode", ["sequential", "batch"])
def test_eval_at_point_equals_a_separate_run_of_that_many_edits(wild_setup, tmp_path, monkeypatch, mode):
    """The curve point after 10 edits equals the summary of a separate 10-edit run, value for value;
    the last point is the run's own summary; a resumed run re-edits but does not re-evaluate the
    points already in `<run>_curve.jsonl`.

    Planted bugs this catches: a point evaluated before its last chunk is applied (or after the
    next one); a point over only the last chunk instead of every request edited so far; a resume
    that recomputes (or loses) the streamed points."""
    model, _ = wild_setup
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(_tiny_records(12)))
    reqs = list(datasets.load_qaedit(data).requests)
    kw = {"edit_mode": mode, "batch_size": 2, "evaluation": "both"}
    rc = _rc(data, tmp_path / "curve", eval_at=(4, 10, 12), **kw)
    results = _results_path(rc)
    with monkeypatch.context() as m:  # killed during the final evaluation, after the points at 4 and 10
        m.setattr(runner, "_append", _dies_writing_line(results, 1, runner._append))
        with pytest.raises(_Killed):
            run(model, reqs, DRIFT_EDIT, None, rc, ExactMatchJudge())
    curve_file = Path(rc.output_dir) / f"{rc.run_name}_curve.jsonl"
    assert [p["n_edits"] for p in _rows(curve_file)] == [4, 10]
    points = []
    monkeypatch.setattr(runner, "curve_point", lambda *a: points.append(a[-1]))
    summary = run(model, reqs, DRIFT_EDIT, None, dataclasses.replace(rc, resume=True), ExactMatchJudge())
    assert points == []  # the streamed points were read back, not evaluated again
    assert [p["n_edits"] for p in summary["curve"]] == [4, 10, 12] and _rows(curve_file) == summary["curve"]

    ten = run(model, reqs[:10], DRIFT_EDIT, None, _rc(data, tmp_path / "ten", **kw), ExactMatchJudge())
    curve = {p["n_edits"]: p for p in summary["curve"]}
    assert curve[10] == {"n_edits": 10, "wild": ten["post"]["wild"], "synthetic": ten["post"]["synthetic"]}
    assert curve[12] == {"n_edits": 12, "wild": summary["post"]["wild"], "synthetic": summary["post"]["synthetic"]}
    assert curve[4] != curve[10]  # the premise: more edits move the figures


def test_eval_at_is_refused_where_it_cannot_hold(tiny_setup, tmp_path):
    model, data = tiny_setup
    with pytest.raises(RunError, match="sequential or batch"):
        _rc(data, tmp_path, eval_at=(2,))
    with pytest.raises(RunError, match="multiples of batch_size=2"):
        _rc(data, tmp_path, edit_mode="batch", batch_size=2, eval_at=(3,))
    with pytest.raises(RunError, match="increasing"):
        _rc(data, tmp_path, edit_mode="sequential", eval_at=(4, 2))
    reqs = list(datasets.load_qaedit(data).requests)
    with pytest.raises(RunError, match="exceeds the 5 requests"):
        run(model, reqs, DRIFT_EDIT, None, _rc(data, tmp_path, edit_mode="sequential", eval_at=(6,)), ExactMatchJudge())
