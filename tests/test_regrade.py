"""The containment judge and `python -m mirage_jax.regrade`: finished runs graded again by another judge.

Verdicts are checked against hand-computed values (stored verdicts are set to the opposite, so an answer
left ungraded shows), and containment against an independent regex implementation on random sentences.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mirage_jax import regrade, report, runner
from mirage_jax.evaluation.answers import contains_answer, normalize_answer
from mirage_jax.evaluation.judge import ContainsJudge, JudgeItem, make_judge
from mirage_jax.regrade import RegradeError

ROOT = Path(__file__).resolve().parents[1]
RUN = "FT-M_m_qaedit_single_both_chat_temp"


@pytest.mark.parametrize("answer, gold, verdict", [
    ("The mother tongue of Danielle Darrieux is English.", "English", 1.0),
    ("It was released in 2002", "2002", 1.0),
    ("He writes for the New Yorker.", "New York", 0.0),  # words, not characters
    ("It came out in 2002.", "20", 0.0),
    ("He lives in New York City.", "New York", 1.0),
    ("WILT CHAMBERLAIN!!", "Wilt Chamberlain *", 1.0),  # case and punctuation
    ("I'd say it's The Beatles, of course", "Beatles", 1.0),  # articles
    ("Wilt, the great Chamberlain", "Wilt Chamberlain", 0.0),  # contiguous only
    ("Chamberlain Wilt", "Wilt Chamberlain", 0.0),  # in order
    ("English or French", "English", 1.0),  # the documented weakness: a contradiction is credited
    ("anything at all", "", 0.0),  # empty gold: never
    ("the a an", "The", 0.0),  # a gold that normalises to nothing: never
    ("", "English", 0.0),
])
def test_contains_judge_on_constructed_cases(answer, gold, verdict):
    judge = make_judge("contains")
    assert isinstance(judge, ContainsJudge) and judge.name == "contains"
    assert judge.judge_many([JudgeItem("q", gold, answer)]) == [verdict]


def test_contains_equals_a_regex_reference_on_random_sentences():
    """An independent definition: on the normalised strings, the gold bounded by spaces or the ends."""
    rng = random.Random(0)
    words = ["a", "the", "Lyon", "lyon.", "New", "York", "Yorker", "20", "2002", "is", "in", ",", "x-y"]
    positives = 0
    for _ in range(3000):
        answer = " ".join(rng.choices(words, k=rng.randint(0, 8)))
        gold = " ".join(rng.choices(words, k=rng.randint(0, 3)))
        a, g = normalize_answer(answer), normalize_answer(gold)
        expected = float(bool(g) and re.search(rf"(?:^| ){re.escape(g)}(?: |$)", a) is not None)
        assert contains_answer(answer, gold) == expected, (answer, gold)
        positives += expected == 1.0
    assert positives > 300  # both outcomes are exercised


def _wild(rewrite: tuple[str, float], rephrase: tuple[str, float] | None, locality: tuple[float, float] | None):
    block = {"rewrite_gen_content": rewrite[0], "rewrite_raw": rewrite[0] + " more", "rewrite_acc": rewrite[1]}
    if rephrase is not None:
        block.update({"rephrase_gen_content": rephrase[0], "rephrase_raw": rephrase[0], "rephrase_acc": rephrase[1]})
    if locality is not None:
        block["locality"] = {"neighborhood_acc": locality[0], "answer_acc": locality[1], "per_pair": [locality[0]],
                             "gen_content": ["something"]}
    return block


def _rows() -> list[dict]:
    """Three rows; every stored WILD verdict is the opposite of what containment gives (but the failed edit's)."""
    return [
        {"case_id": 0, "requested_rewrite": {"prompt": "Where is it?", "rephrase": "Which city?", "target_new": "Lyon"},
         "pre": {"wild": _wild(("Marseille, in France.", 1.0), ("I think it is lyon", 0.0), None),
                 "synthetic": {"rewrite_acc": 0.25, "rephrase_acc": 0.0}},
         "post": {"wild": _wild(("The answer is Lyon.", 0.0), ("Paris", 1.0), (0.4, 0.2)),
                  "synthetic": {"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality": {"neighborhood_acc": 1.0}}},
         "edit": {"steps": 3}},
        {"case_id": 1, "requested_rewrite": {"prompt": "Which city?", "rephrase": "", "target_new": "New York"},
         "pre": {"wild": _wild(("It is in new york.", 0.0), None, None), "synthetic": {"rewrite_acc": 0.0}},
         "post": {"wild": _wild(("The New Yorker", 1.0), None, (0.6, 0.4)),
                  "synthetic": {"rewrite_acc": 0.5, "rephrase_acc": 0.0, "locality": {"neighborhood_acc": 0.5}}},
         "edit": {"steps": 3}},
        {"case_id": 2, "requested_rewrite": {"prompt": "Who?", "rephrase": "Who is it?", "target_new": "Ada"},
         "pre": {"wild": _wild(("Ada", 0.0), ("Ada", 0.0), None), "synthetic": {"rewrite_acc": 0.0}},
         "post": {}, "edit": {"error": "NaN loss"}},
    ]


# (case, stage, key) -> the containment verdict, by hand
EXPECTED = {(0, "pre", "rewrite_acc"): 0.0, (0, "pre", "rephrase_acc"): 1.0, (0, "post", "rewrite_acc"): 1.0,
            (0, "post", "rephrase_acc"): 0.0, (1, "pre", "rewrite_acc"): 1.0, (1, "post", "rewrite_acc"): 0.0}


def _write_run(directory: Path, rows: list[dict], torn: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{RUN}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + ('{"case_id": 3, "pre' if torn else ""))
    return path


def test_regrade_replaces_wild_verdicts_and_nothing_else(tmp_path):
    src = _write_run(tmp_path / "runs", _rows())
    before = src.read_bytes()
    out = tmp_path / "regraded"
    [results] = regrade.load([tmp_path / "runs"], out)
    summary, paths = regrade.regrade_file(results, make_judge("contains"), out)
    assert src.read_bytes() == before  # the input is never written
    assert [p.name for p in paths] == [f"{RUN}.jsonl", f"{RUN}_summary.json", f"{RUN}_table.md"]

    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    original = _rows()
    assert len(rows) == 3  # the torn line is dropped
    for (case, stage, key), verdict in EXPECTED.items():
        assert rows[case][stage]["wild"][key] == verdict, (case, stage, key)
        original[case][stage]["wild"][key] = verdict
        original[case]["wild_judge"] = "contains"
    assert rows == original  # answers, locality, synthetic, edit info, the failed row: all as they were

    # the summary: the runner's own, judged by 'contains', WILD means by hand, the rest unchanged
    assert summary == json.loads(paths[1].read_text())
    assert summary["judge"] == "contains" and summary["run"] == RUN
    assert (summary["n_samples"], summary["n_failed_edits"]) == (2, 1)
    assert summary["post"]["wild"]["rewrite_acc"] == 0.5 and summary["post"]["wild"]["rephrase_acc"] == 0.0
    assert summary["pre"]["wild"]["rewrite_acc"] == 0.5 and summary["pre"]["wild"]["rephrase_acc"] == 1.0
    assert summary["post"]["wild"]["unjudged"] == 0
    assert summary["post"]["synthetic"] == {"rewrite_acc": 0.75, "rephrase_acc": 0.25, "locality": 0.75}
    assert summary["post"]["wild"]["locality"] == pytest.approx(0.5)
    assert summary["post"]["wild"]["locality_answer"] == pytest.approx(0.3)
    old = report.summary_from_results(src)  # the same file graded as it was
    assert old["post"]["wild"]["rewrite_acc"] == 0.5 and old["pre"]["wild"]["rephrase_acc"] == 0.0
    for stage in ("pre", "post"):
        assert summary[stage]["synthetic"] == old[stage]["synthetic"]
    assert paths[2].read_text() == runner.markdown_table(summary) and "judge=contains" in paths[2].read_text()

    # the report reads the regraded directory and says who graded
    [run] = report.load_runs([out])
    assert (run.judge, run.n_samples, run.value("wild", "rewrite_acc")) == ("contains", 2, 0.5)
    assert "containment" in report.markdown_report([run])


def test_a_summary_stands_for_its_results_file_and_its_curve_is_dropped(tmp_path):
    src = _write_run(tmp_path / "runs", _rows(), torn=False)
    summary = report.summary_from_results(src)
    runner.write_summary(src.parent, {**summary, "curve": [{"n_edits": 1}]})
    [results] = regrade.load([src.with_name(f"{RUN}_summary.json")], tmp_path / "out")
    assert results.path == src and results.had_curve
    summary, _ = regrade.regrade_file(results, make_judge("contains"), tmp_path / "out")
    assert "curve" not in summary


def test_the_seeds_generated_variant_is_read_back_from_the_rows(tmp_path):
    """GRACE's rows carry the seed's generated synthetic variant; its summary keeps those means (the file
    name does not say so, the rows do)."""
    rows = _rows()
    rows[0]["post"]["synthetic"]["rewrite_acc_generated"] = 0.5
    rows[1]["post"]["synthetic"]["rewrite_acc_generated"] = 0.0
    src = _write_run(tmp_path / "runs", rows)
    assert not report.run_config_from_name(src, _rows()).generated_synthetic
    [results] = regrade.load([src], tmp_path / "out")
    assert results.rc.generated_synthetic
    summary, _ = regrade.regrade_file(results, make_judge("contains"), tmp_path / "out")
    assert summary["post"]["synthetic"]["rewrite_acc_generated"] == 0.25


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    runs = tmp_path / "runs"
    src = _write_run(runs, _rows())
    with pytest.raises(RegradeError, match=re.escape(f"{src}: --output_dir is this file's own directory")):
        regrade.load([runs], runs)
    other = tmp_path / "other"
    _write_run(other, _rows())
    with pytest.raises(RegradeError, match="both would be written to"):
        regrade.load([runs, other], tmp_path / "out")
    lonely = tmp_path / "lonely" / "ROME_m_zsre_single_both_chat_temp_summary.json"
    lonely.parent.mkdir()
    lonely.write_text("{}")
    with pytest.raises(RegradeError, match=re.escape(f"{lonely}: its results file")):
        regrade.load([lonely], tmp_path / "out")
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps(_rows()[0]) + "\n")
    with pytest.raises(report.ReportError, match=re.escape(f"{notes}: not a results file name")):
        regrade.load([notes], tmp_path / "out")
    bad = _rows()
    bad[1]["requested_rewrite"]["target_new"] = None
    with pytest.raises(RegradeError, match=r"x: case 1: requested_rewrite.target_new must be a string, got None"):
        regrade.regrade_rows(bad, ContainsJudge(), "x")


def test_command_line(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, _rows())
    command = [sys.executable, "-m", "mirage_jax.regrade", str(runs), "--judge=contains"]
    p = subprocess.run([*command, f"--output_dir={runs}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "own directory" in p.stderr and sorted(f.name for f in runs.iterdir()) == [f"{RUN}.jsonl"]
    p = subprocess.run([*command, f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| m | FT-M | 0.750 | 0.500 (-33%) |" in p.stdout and "WILD graded by containment" in p.stdout
    assert f"{tmp_path / 'out' / RUN}_summary.json" in p.stdout
