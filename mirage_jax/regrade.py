"""Grade finished runs' WILD answers again, with another judge, without editing again.

    python -m mirage_jax.regrade out/ [more results directories or files ...] --judge=contains --output_dir=regraded/

Why: editing is the expensive part and the WILD answers are already in the results file; the judge is
cheap and replaceable. Edit once (on CPU, exact match), then grade with `--judge=contains` (no key),
`--judge=llm` (the paper's) or `--judge=local`, and keep each grading in its own directory.

Files are found as the report finds them (`report.collect_files`: directories searched recursively,
hidden ones such as `.pre_cache/` skipped, a summary standing for its results file). For each results
file `<run>.jsonl`, written as `<output_dir>/<run>.jsonl`:

* changed: the pre- and post-edit WILD `rewrite_acc` / `rephrase_acc` of every row whose edit succeeded,
  graded as the runner grades them (question `requested_rewrite.prompt` / `.rephrase`, gold `target_new`,
  the stored cleaned answer `*_gen_content`), one `judge_many` call per file; those rows gain
  `"wild_judge": <judge name>` (the runner's rows name no judge: their summary does);
* unchanged: the answers, WILD locality (it compares generations; no judge), the synthetic evaluation,
  and rows whose edit failed (`edit.error`; `summarise` leaves them out anyway);
* dropped: a torn last line (as `--resume` drops it) and a sequential run's `curve` (its points were
  graded on answers that are not stored, so they cannot be graded again);
* then `<run>_summary.json` and `<run>_table.md` by the runner's own `summarise` and `write_summary`,
  with `judge` set to the new judge's name, so the report says who graded.

The run's settings are read back from the file name, as the report reads a results file without its
summary (`report.run_config_from_name`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from absl import flags

from mirage_jax import cli, io
from mirage_jax.evaluation.judge import Judge, JudgeItem
from mirage_jax.report import collect_files, read_results, run_config_from_name
from mirage_jax.runner import RunConfig, summarise, write_summary

# WILD answer key -> the requested_rewrite field holding its question (runner._scored).
QUESTION_FIELDS = (("rewrite", "prompt"), ("rephrase", "rephrase"))
JUDGE_FIELD = "wild_judge"


class RegradeError(ValueError):
    """Input regrade cannot use: a summary without its results file, an output that would overwrite an input..."""


@dataclasses.dataclass(frozen=True)
class ResultsFile:
    """One results file, read and checked, before anything is judged or written."""

    path: Path
    rows: list[dict]
    rc: RunConfig
    had_curve: bool  # the run's summary had a curve, which regrading drops


def _results_path(found: Path) -> Path:
    """The results file a collected file stands for (a summary stands for the one beside it)."""
    if found.suffix == ".jsonl":
        return found
    results = found.with_name(found.name.removesuffix("_summary.json") + ".jsonl")
    if not results.exists():
        raise RegradeError(f"{found}: its results file {results.name} is missing, and only the answers in a "
                           "results file can be graded again")
    return results


def _has_curve(summary: Path) -> bool:
    try:
        return summary.exists() and "curve" in json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, TypeError):
        return False  # not readable as a summary: nothing of it is carried over anyway


def load(paths: Iterable[str | Path], output_dir: str | Path) -> list[ResultsFile]:
    """Every results file under `paths`, read and checked; nothing is written."""
    out = Path(output_dir).resolve()
    files: list[ResultsFile] = []
    names: dict[str, Path] = {}
    for found in collect_files(paths):
        path = _results_path(found)
        if path.parent.resolve() == out:
            raise RegradeError(f"{path}: --output_dir is this file's own directory; regrading would overwrite "
                               "it (choose another --output_dir)")
        if path.name in names:
            raise RegradeError(f"{path} and {names[path.name]}: both would be written to {out / path.name}; "
                               "regrade them into different --output_dir")
        names[path.name] = path
        rows = read_results(path)
        rc = run_config_from_name(path, rows)
        if rc.run_name != path.stem:
            raise RegradeError(f"{path}: not a name the runner writes (it would be {rc.run_name}.jsonl)")
        files.append(ResultsFile(path, rows, rc, _has_curve(path.with_name(path.stem + "_summary.json"))))
    return files


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RegradeError(f"{where} must be a string, got {value!r}"[:300])
    return value


def _to_grade(row: dict, where: str) -> list[tuple[dict, str, JudgeItem]]:
    """(WILD block, verdict key, item) for every WILD answer of a row, pre and post."""
    out = []
    for stage in ("pre", "post"):
        if not isinstance(row[stage], dict):
            raise RegradeError(f"{where}: '{stage}' must be an object, got {type(row[stage]).__name__}")
        block = row[stage].get("wild")
        if block is None:
            continue
        if not isinstance(block, dict):
            raise RegradeError(f"{where}: '{stage}.wild' must be an object, got {type(block).__name__}")
        for key, field in QUESTION_FIELDS:
            if f"{key}_gen_content" not in block:
                continue  # no such question in this record (no rephrase), so never judged
            request = row.get("requested_rewrite")
            if not isinstance(request, dict):
                raise RegradeError(f"{where}: 'requested_rewrite' must be an object, got {request!r}"[:300])
            item = JudgeItem(question=_string(request.get(field), f"{where}: requested_rewrite.{field}"),
                             gold=_string(request.get("target_new"), f"{where}: requested_rewrite.target_new"),
                             answer=_string(block[f"{key}_gen_content"], f"{where}: {stage}.wild.{key}_gen_content"))
            out.append((block, f"{key}_acc", item))
    return out


def regrade_rows(rows: Sequence[dict], judge: Judge, source: str = "") -> list[dict]:
    """Copies of `rows` with their WILD verdicts replaced by `judge`'s (module doc), in one `judge_many`."""
    new = copy.deepcopy(list(rows))
    todo = []
    for row in new:
        if "error" in (row["edit"] if isinstance(row["edit"], dict) else {}):
            continue  # a failed edit: passed through as it is
        targets = _to_grade(row, f"{source}: case {row['case_id']}")
        if any(isinstance(row[stage], dict) and "wild" in row[stage] for stage in ("pre", "post")):
            row[JUDGE_FIELD] = judge.name
        todo += targets
    verdicts = judge.judge_many([item for *_, item in todo])
    if len(verdicts) != len(todo):
        raise RegradeError(f"judge {judge.name} gave {len(verdicts)} verdicts for {len(todo)} answers")
    for (block, key, _), verdict in zip(todo, verdicts):
        block[key] = verdict
    return new


def regrade_file(results: ResultsFile, judge: Judge, output_dir: str | Path) -> tuple[dict, list[Path]]:
    """Grade one results file again and write its rows, summary and table; returns (summary, paths)."""
    out = Path(output_dir)
    rows = regrade_rows(results.rows, judge, str(results.path))
    path = out / results.path.name
    io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarise(rows, results.rc, judge.name)
    return summary, [path, *write_summary(out, summary)]


# --- command line -----------------------------------------------------------------------------------


def _define_flags() -> None:
    cli.define_judge_flags()
    flags.DEFINE_string("output_dir", None, "directory for the regraded results, summaries and tables (not the "
                        "directory of an input)")
    flags.mark_flag_as_required("output_dir")


def main(argv: Sequence[str]) -> None:
    from mirage_jax import report

    fv = flags.FLAGS
    if len(argv) < 2:
        raise RegradeError("give one or more results directories or files (*_summary.json, results *.jsonl)")
    files = load(argv[1:], fv.output_dir)  # every input checked before the judge starts (it may load a model)
    judge = cli.judge_from_flags(str(Path(fv.output_dir) / "judge_cache.jsonl"))
    runs, written = [], []
    for results in files:
        summary, paths = regrade_file(results, judge, fv.output_dir)
        runs.append(report.run_from_summary(summary, str(paths[1])))
        written += paths
        if results.had_curve:
            written.append(f"  (the curve of {results.path.name} is left out: its points' answers are not stored)")
    try:
        print(report.markdown_table(*report.build_table(runs)))
    except report.ReportError:  # e.g. a 'wild' and a 'both' run of one method: one table row each is ambiguous
        print("\n".join(f"{r.source}: Rel WILD {report.fmt(r.value('wild', 'rewrite_acc'))}, "
                        f"Gen WILD {report.fmt(r.value('wild', 'rephrase_acc'))}" for r in runs))
    print()
    print(report.judge_line(judge.name, sum(r.unjudged for r in runs)))
    print()
    for path in written:
        print(path)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    try:
        app.run(main)
    except ValueError as err:  # RegradeError, ReportError and the judges' setting errors: one line
        sys.exit(f"error: {err}")
