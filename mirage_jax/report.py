"""Finished runs -> the paper's table, its shaded figure, and sequential-editing curves.

    python -m mirage_jax.report out/ [more results directories or files ...] --out=report [--compare=paper]

Reads every `<run>_summary.json` and results `<run>.jsonl` it is given (directories are searched
recursively, hidden ones such as `.pre_cache/` skipped) and writes into `--out`:

* `report.md`: one markdown table in the layout of the paper's results figure (spec §6): rows are
  model x method, columns per dataset Rel syn / Rel WILD / Gen syn / Gen WILD (reliability =
  `rewrite_acc`, generalisation = `rephrase_acc`, post-edit) plus locality (syn and WILD), each WILD
  cell with its relative change from syn, `(WILD - syn) / syn` -- the drop the paper shades. A cell
  no run measured is blank, never 0. With `--compare=paper` a row of the paper's numbers follows
  each of ours that has a counterpart there (same method, dataset and model), filled only in the
  cells both have.
* `report.png`: the same table drawn like the paper's figure, WILD cells shaded by the drop.
* `curves.png` (when a summary carries a `curve`, i.e. a sequential run with `--eval_at`):
  reliability against the number of edits made so far, synthetic dashed, WILD solid, one colour
  per method, log x.

Why a summary is checked before it is used: a table that silently mixes files of different layouts
would report wrong numbers with no sign of it. A summary names its layout in `"schema"`
(`runner.SUMMARY_SCHEMA`); another version is an error. A summary without the field is accepted
when it has every key of schema 1: those are files written before the field existed (the layout did
not change), and rejecting them would orphan every run made so far.

A results `.jsonl` with no summary beside it (a run killed before its end) is summarised here with
the runner's own `summarise`, its settings read back from the file name the runner gave it; its
judge is unknown, and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import flags

if TYPE_CHECKING:
    from mirage_jax.runner import RunConfig

SCHEMA = 1  # the summary layout this module reads; the runner writes runner.SUMMARY_SCHEMA (a test keeps them equal)
SUMMARY_KEYS = ("method", "model", "dataset", "edit_mode", "judge", "n_samples", "post")
KINDS = ("synthetic", "wild")
METRICS = ("rewrite_acc", "rephrase_acc", "locality")
DATASET_ORDER = ("zsre", "counterfact", "qaedit", "demo")  # the paper's column order, then our demo set
DATASET_TITLES = {"zsre": "ZsRE", "counterfact": "CounterFact", "qaedit": "QAEdit", "demo": "demo"}
METHOD_ORDER = ("FT-L", "FT-M", "MEND", "ROME", "R-ROME", "MEMIT", "AlphaEdit", "GRACE", "WISE")
# The name the runner gives a results file (RunConfig.run_name): method_model_dataset_mode_evaluation_context.
RUN_NAME = re.compile(r"(?P<method>[^_]+)_(?P<model>.+)_(?P<dataset>[^_]+)_(?P<mode>single|sequential|batch\d+)_"
                      r"(?P<evaluation>wild|synthetic|both)_(?P<context>question-only|qa_inst|chat_temp|none)")
UNKNOWN_JUDGE = "unknown (results file without its summary)"
DROP_COLOUR = "#5fb3a1"  # the teal of the paper's figure at a 100 % drop; white at 0 %


class ReportError(ValueError):
    """Input the report cannot use: a missing path, a file of another layout, a duplicate cell."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a dataset's group: `metric` of the `kind` evaluation, post-edit."""

    title: str
    kind: str  # 'synthetic' or 'wild'
    metric: str  # 'rewrite_acc', 'rephrase_acc' or 'locality'

    @property
    def shaded(self) -> bool:
        """WILD reliability / generalisation: the cells the paper shades by their drop from syn."""
        return self.kind == "wild" and self.metric != "locality"


COLUMNS = (Column("Rel syn", "synthetic", "rewrite_acc"), Column("Rel WILD", "wild", "rewrite_acc"),
           Column("Gen syn", "synthetic", "rephrase_acc"), Column("Gen WILD", "wild", "rephrase_acc"),
           Column("Loc syn", "synthetic", "locality"), Column("Loc WILD", "wild", "locality"))


# --- the paper's numbers --------------------------------------------------------------------------
# Spec §6 (the paper's results figure, `figs/Results_CR.png` of the seed; checked digit by digit
# against ../shared/seed/paper-results-table.png): single editing, default WILD pipeline, GPT-4o-mini
# judge. Per dataset (ZsRE, CounterFact, QAEdit): Rel syn, Rel WILD, Gen syn, Gen WILD. No locality.
PAPER_DATASETS = ("zsre", "counterfact", "qaedit")
PAPER_ROWS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("Llama-2-7b-chat", "FT-M", (1.000, 0.562, 0.950, 0.470, 1.000, 0.867, 0.503, 0.426, 1.000, 0.611, 0.966, 0.560)),
    ("Llama-2-7b-chat", "MEND", (0.967, 0.288, 0.949, 0.244, 0.997, 0.478, 0.425, 0.183, 0.942, 0.333, 0.900, 0.328)),
    ("Llama-2-7b-chat", "ROME", (0.964, 0.741, 0.811, 0.656, 0.996, 0.836, 0.452, 0.420, 0.955, 0.585, 0.744, 0.411)),
    ("Llama-2-7b-chat", "MEMIT", (0.950, 0.685, 0.858, 0.634, 0.997, 0.797, 0.513, 0.460, 0.929, 0.552, 0.791, 0.450)),
    ("Llama-2-7b-chat", "GRACE", (0.986, 0.033, 0.319, 0.029, 0.998, 0.013, 0.114, 0.008, 0.983, 0.012, 0.383, 0.087)),
    ("Llama-2-7b-chat", "WISE", (0.999, 0.139, 0.973, 0.081, 0.999, 0.521, 0.612, 0.104, 0.998, 0.216, 0.877, 0.122)),
    ("Mistral-7b", "FT-M", (1.000, 0.441, 0.824, 0.358, 1.000, 0.733, 0.330, 0.220, 1.000, 0.562, 0.862, 0.503)),
    ("Mistral-7b", "MEND", (0.977, 0.719, 0.963, 0.657, 0.820, 0.431, 0.355, 0.149, 0.903, 0.544, 0.895, 0.516)),
    ("Mistral-7b", "ROME", (0.757, 0.608, 0.717, 0.573, 0.965, 0.866, 0.466, 0.488, 0.845, 0.555, 0.735, 0.435)),
    ("Mistral-7b", "MEMIT", (0.868, 0.707, 0.842, 0.670, 0.962, 0.887, 0.539, 0.583, 0.850, 0.563, 0.788, 0.485)),
    ("Mistral-7b", "GRACE", (0.995, 0.035, 0.350, 0.029, 1.000, 0.011, 0.110, 0.006, 0.991, 0.018, 0.421, 0.080)),
    ("Mistral-7b", "WISE", (0.948, 0.033, 0.903, 0.025, 0.868, 0.129, 0.420, 0.027, 0.979, 0.024, 0.906, 0.064)),
    ("Llama-3-8b", "FT-M", (1.000, 0.706, 0.995, 0.698, 1.000, 0.916, 0.588, 0.613, 1.000, 0.560, 0.988, 0.576)),
    ("Llama-3-8b", "ROME", (0.996, 0.820, 0.971, 0.789, 0.999, 0.877, 0.422, 0.491, 0.987, 0.691, 0.865, 0.570)),
    ("Llama-3-8b", "MEMIT", (0.982, 0.803, 0.961, 0.781, 0.998, 0.882, 0.516, 0.557, 0.967, 0.649, 0.886, 0.566)),
    ("Llama-3-8b", "GRACE", (0.999, 0.036, 0.261, 0.032, 1.000, 0.008, 0.008, 0.005, 0.999, 0.018, 0.366, 0.103)),
    ("Llama-3-8b", "WISE", (0.859, 0.091, 0.825, 0.075, 0.807, 0.212, 0.508, 0.075, 0.910, 0.121, 0.876, 0.138)),
)
# The "Average" row as printed (recomputing it from the rows above agrees to 0.001 except QAEdit
# Gen WILD, 0.353 vs 0.351 printed; spec §6).
PAPER_AVERAGE = (0.956, 0.438, 0.792, 0.400, 0.965, 0.557, 0.405, 0.283, 0.956, 0.389, 0.779, 0.351)
# Checkpoint names (lower case, "meta-" prefix and "-hf" suffix dropped) that are the paper's models.
# The seed's configs load Llama-2-7b-chat, Mistral-7B-v0.1 and "Llama-3-8B" (which of base or
# instruct is not recorded: both are matched); --paper_model picks one by hand for any other model.
PAPER_MODEL_ALIASES = {"llama-2-7b-chat": "Llama-2-7b-chat", "mistral-7b": "Mistral-7b",
                       "mistral-7b-v0.1": "Mistral-7b", "llama-3-8b": "Llama-3-8b",
                       "llama-3-8b-instruct": "Llama-3-8b"}
PAPER_MODELS = ("Llama-2-7b-chat", "Mistral-7b", "Llama-3-8b")


def paper_cells(model: str, method: str) -> dict[tuple[str, Column], float]:
    """The paper's numbers for (paper model, method): {(dataset, column): value}; empty when absent."""
    for m, meth, values in PAPER_ROWS:
        if (m, meth) == (model, method):
            cols = [c for c in COLUMNS if c.metric != "locality"]
            return {(d, c): values[4 * i + j] for i, d in enumerate(PAPER_DATASETS) for j, c in enumerate(cols)}
    return {}


def paper_model_for(model: str) -> str | None:
    """The paper's name for our checkpoint name, if it is one of the paper's models."""
    key = model.lower().removeprefix("meta-").removesuffix("-hf")
    return PAPER_MODEL_ALIASES.get(key)


# --- reading runs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """The evaluation of all edits made so far, after `n_edits` of them (sequential `--eval_at`)."""

    n_edits: int
    metrics: Mapping[str, Mapping[str, float | None]]  # kind -> metric -> value

    def value(self, kind: str, metric: str) -> float | None:
        return self.metrics.get(kind, {}).get(metric)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the report needs from one run's summary."""

    source: str  # the file it was read from
    model: str
    method: str
    dataset: str
    edit_mode: str
    judge: str
    n_samples: int
    n_failed_edits: int
    unjudged: int  # WILD answers the judge could not grade (left out of the means)
    post: Mapping[str, Mapping[str, float | None]]  # kind -> metric -> post-edit mean
    curve: tuple[CurvePoint, ...] = ()

    def value(self, kind: str, metric: str) -> float | None:
        return self.post.get(kind, {}).get(metric)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReportError(f"{where} must be a number or null, got {value!r}")
    return float(value)


def _metrics(block: Any, where: str) -> dict[str, dict[str, float | None]]:
    """{kind: {metric: value}} of a summary's `post` block or a curve point (other keys ignored)."""
    if not isinstance(block, dict):
        raise ReportError(f"{where} must be an object, got {type(block).__name__}")
    out = {}
    for kind in KINDS:
        if kind in block:
            if not isinstance(block[kind], dict):
                raise ReportError(f"{where}.{kind} must be an object, got {type(block[kind]).__name__}")
            out[kind] = {m: _number(block[kind].get(m), f"{where}.{kind}.{m}") for m in METRICS}
    return out


def run_from_summary(summary: Any, source: str) -> Run:
    """Check a summary's layout (module doc) and read it."""
    if not isinstance(summary, dict):
        raise ReportError(f"{source}: not a run summary (a JSON object), got {type(summary).__name__}")
    version = summary.get("schema")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if version is None and missing:
        raise ReportError(f"{source}: not a mirage_jax run summary: no 'schema' field and no {', '.join(missing)}")
    if version is not None and (isinstance(version, bool) or version != SCHEMA):
        raise ReportError(f"{source}: summary schema {version!r}, but this mirage_jax reads schema {SCHEMA}; "
                          "report it with the version that wrote it")
    if missing:
        raise ReportError(f"{source}: schema {SCHEMA} summary without {', '.join(missing)}")
    for key in ("method", "model", "dataset", "edit_mode", "judge"):
        if not isinstance(summary[key], str) or not summary[key]:
            raise ReportError(f"{source}: '{key}' must be a non-empty string, got {summary[key]!r}")
    counts = {}
    for key in ("n_samples", "n_failed_edits"):
        n = summary.get(key, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ReportError(f"{source}: '{key}' must be a non-negative integer, got {n!r}")
        counts[key] = n
    unjudged = summary["post"].get("wild", {}).get("unjudged", 0) if isinstance(summary["post"], dict) else 0
    curve = summary.get("curve", [])
    if not isinstance(curve, list):
        raise ReportError(f"{source}: 'curve' must be a list, got {type(curve).__name__}")
    points = []
    for i, point in enumerate(curve):
        where = f"{source}: curve[{i}]"
        n = point.get("n_edits") if isinstance(point, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ReportError(f"{where}.n_edits must be a positive integer, got {n!r}")
        points.append(CurvePoint(n, _metrics(point, where)))
    return Run(source=source, model=summary["model"], method=summary["method"], dataset=summary["dataset"],
               edit_mode=summary["edit_mode"], judge=summary["judge"], n_samples=counts["n_samples"],
               n_failed_edits=counts["n_failed_edits"], unjudged=int(unjudged or 0),
               post=_metrics(summary["post"], f"{source}: post"),
               curve=tuple(sorted(points, key=lambda p: p.n_edits)))


def read_results(path: Path) -> list[dict]:
    """The rows of a results file; a torn last line (a kill mid-write) is dropped, as `--resume` drops it."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # torn by a kill mid-write; the runner drops it on --resume too
                continue
            raise ReportError(f"{path}: line {lineno} is not JSON") from None
        if not isinstance(row, dict) or not {"case_id", "pre", "post", "edit"} <= row.keys():
            raise ReportError(f"{path}: line {lineno} is not a results row (case_id, pre, post, edit)")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path}: no finished samples")
    return rows


def run_config_from_name(path: Path, rows: Sequence[dict] = ()) -> RunConfig:
    """The `runner.RunConfig` a results file was written under, as far as `summarise` needs it: read back
    from the name the runner gave the file (settings the name does not hold keep their defaults). The seed's
    generated synthetic variant (GRACE) is on when any row has its `rewrite_acc_generated`."""
    name = RUN_NAME.fullmatch(path.stem)
    if name is None:
        raise ReportError(f"{path}: not a results file name (<method>_<model>_<dataset>_<mode>_<evaluation>_"
                          "<context>.jsonl), so the run's settings are unknown")
    from mirage_jax.evaluation.wild import WildConfig
    from mirage_jax.runner import RunConfig

    mode = name["mode"]
    wild_cfg = WildConfig() if name["context"] == "none" else WildConfig(context_type=name["context"])
    generated = any("rewrite_acc_generated" in (r.get(stage) or {}).get("synthetic", {})
                    for r in rows for stage in ("pre", "post"))
    return RunConfig(method=name["method"], model_name=name["model"], dataset=name["dataset"], data_path="",
                     edit_mode="batch" if mode.startswith("batch") else mode,
                     batch_size=int(mode[5:]) if mode.startswith("batch") else 1,
                     evaluation=name["evaluation"], wild=wild_cfg, generated_synthetic=generated)


def summary_from_results(path: Path) -> dict:
    """The summary of a results file (no summary beside it), by the runner's own `summarise`."""
    from mirage_jax.runner import summarise

    run_config_from_name(path)  # a file of another name is refused before it is read
    rows = read_results(path)
    return summarise(rows, run_config_from_name(path, rows), UNKNOWN_JUDGE)


def _is_results_file(path: Path) -> bool:
    return path.suffix == ".jsonl" and RUN_NAME.fullmatch(path.stem) is not None


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Summaries and results files under `paths`; a run's summary stands for its results file."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)
                            and (f.name.endswith("_summary.json") or _is_results_file(f)))
            if not inside:
                raise ReportError(f"{p}: no *_summary.json or results *.jsonl in it")
            found += inside
        elif p.name.endswith("_summary.json") or p.suffix == ".jsonl":
            found.append(p)
        else:
            raise ReportError(f"{p}: neither a run's *_summary.json nor its results *.jsonl")
    summarised = {f.resolve().with_name(f.name.removesuffix("_summary.json")) for f in found
                  if f.name.endswith("_summary.json")}
    out, seen = [], set()
    for f in found:
        key = f.resolve()
        if key in seen or (f.suffix == ".jsonl" and key.with_suffix("") in summarised):
            continue
        seen.add(key)
        out.append(f)
    return out


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under `paths` (directories or files), checked."""
    runs = []
    for f in collect_files(paths):
        if f.suffix == ".jsonl":
            summary = summary_from_results(f)
        else:
            try:
                summary = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ReportError(f"{f}: not JSON ({err.msg}, line {err.lineno})") from None
        runs.append(run_from_summary(summary, str(f)))
    return runs


# --- the table ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a model x method (x edit mode), ours or the paper's."""

    model: str
    method: str
    edit_mode: str
    paper: bool  # the paper's numbers (--compare=paper)
    cells: Mapping[tuple[str, Column], float]  # (dataset, column) -> value; a missing key is a blank cell

    @property
    def label(self) -> str:
        mode = "" if self.edit_mode == "single" else f" ({self.edit_mode})"
        return f"{self.method}{mode}" + (" [paper]" if self.paper else "")


def drop(syn: float | None, wild: float | None) -> float | None:
    """Relative drop syn -> WILD, (syn - WILD) / syn; None when either is missing or syn is 0."""
    if syn is None or wild is None or syn <= 0:
        return None
    return (syn - wild) / syn


def cell_drop(row: Row, dataset: str, col: Column) -> float | None:
    """The drop a shaded (WILD Rel / Gen) cell shows; None for the other cells."""
    if not col.shaded:
        return None
    syn = next(c for c in COLUMNS if c.kind == "synthetic" and c.metric == col.metric)
    return drop(row.cells.get((dataset, syn)), row.cells.get((dataset, col)))


def _order(values: Iterable[str], first: Sequence[str]) -> list[str]:
    """Distinct `values`, those in `first` in its order, then the others alphabetically."""
    return sorted(set(values), key=lambda v: (first.index(v) if v in first else len(first), v))


def _method_rank(method: str) -> tuple[int, str]:
    """The paper's row order of methods, then any other alphabetically."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def build_table(runs: Sequence[Run], compare: str | None = None,
                paper_model: str | None = None) -> tuple[list[str], list[Row]]:
    """(datasets, rows) of the report table. Two runs for one cell are an error naming both files:
    which to show is the user's decision (e.g. two context types in one directory)."""
    if compare not in (None, "paper"):
        raise ReportError(f"unknown comparison {compare!r}; valid: paper")
    if paper_model is not None and paper_model not in PAPER_MODELS:
        raise ReportError(f"unknown paper model {paper_model!r}; valid: {', '.join(PAPER_MODELS)}")
    cells: dict[tuple[str, str, str], dict[tuple[str, Column], float]] = {}
    owner: dict[tuple[str, str, str, str], str] = {}
    for r in runs:
        key = (r.model, r.method, r.edit_mode)
        if (*key, r.dataset) in owner:
            raise ReportError(f"two runs of {r.method} on {r.model}, {r.dataset}, {r.edit_mode}: "
                              f"{owner[(*key, r.dataset)]} and {r.source}; pass the files to report instead")
        owner[(*key, r.dataset)] = r.source
        row = cells.setdefault(key, {})
        for col in COLUMNS:
            v = r.value(col.kind, col.metric)
            if v is not None:
                row[(r.dataset, col)] = v
    datasets = _order((r.dataset for r in runs), DATASET_ORDER)
    rows = []
    models = _order((k[0] for k in cells), ())
    for key in sorted(cells, key=lambda k: (models.index(k[0]), _method_rank(k[1]), k[2] != "single", k[2])):
        ours = Row(*key, paper=False, cells=cells[key])
        rows.append(ours)
        if compare == "paper":
            pm = paper_model or paper_model_for(ours.model)
            theirs = paper_cells(pm, ours.method) if pm else {}
            shared = {k: v for k, v in theirs.items() if k in ours.cells}
            if shared:
                rows.append(Row(pm, ours.method, "single", paper=True, cells=shared))
    return datasets, rows


def fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _fmt_cell(row: Row, dataset: str, col: Column) -> str:
    v = row.cells.get((dataset, col))
    if v is None:
        return ""
    d = cell_drop(row, dataset, col)
    return fmt(v) if d is None else f"{fmt(v)} ({0.0 - d:+.0%})"  # (WILD - syn) / syn; 0.0 - d: no "-0%"


def markdown_table(datasets: Sequence[str], rows: Sequence[Row]) -> str:
    """The table in markdown, 3 decimals, the WILD cells with their change from syn."""
    head = ["Model", "Method"] + [f"{DATASET_TITLES.get(d, d)} {c.title}" for d in datasets for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        vals = [_fmt_cell(row, d, c) for d in datasets for c in COLUMNS]
        lines.append("| " + " | ".join([row.model, row.label, *vals]) + " |")
    return "\n".join(lines)


LEGEND = ("Rel = reliability (`rewrite_acc`), Gen = generalisation (`rephrase_acc`), Loc = locality "
          "(`neighborhood_acc`): post-edit means. (±x%) = relative change syn -> WILD, (WILD - syn) / syn, "
          "the drop the paper's figure shades. A blank cell was not measured.")


def judge_line(judge: str, unjudged: int = 0) -> str:
    """One line on who graded WILD and what that grader cannot credit."""
    if judge == "exact_match":
        line = ("WILD graded by exact match: an answer counts only if, normalised (case, punctuation, articles), "
                "it equals the target, so a correct answer inside a sentence (\"It is Lyon.\") or under "
                "another name scores 0; --judge=llm grades like the paper (gpt-4o-mini)")
    elif judge == "contains":
        line = ("WILD graded by containment: an answer counts if, normalised, the target's words occur in it in "
                "order, so it also credits an answer that contradicts the target (\"English or French\"); a keyless "
                "proxy, not the paper's judge (--judge=llm)")
    elif judge.startswith("llm:"):
        line = f"WILD graded by the LLM judge {judge[4:]} (the paper's rubric, CORRECT / INCORRECT)"
    elif judge.startswith("local:"):
        line = f"WILD graded by the local judge model {judge[6:]} (the paper's rubric, run on this machine)"
    else:
        line = f"WILD graded by {judge}"
    if unjudged:
        line += f"; {unjudged} answers could not be graded and are left out of the means"
    return line + "."


# --- curves ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of the curves figure: reliability of `kind` after n edits."""

    method: str
    kind: str
    n_edits: tuple[int, ...]
    values: tuple[float, ...]


def curve_series(runs: Sequence[Run], metric: str = "rewrite_acc") -> dict[tuple[str, str], list[Series]]:
    """{(model, dataset): lines} of the runs that carry a curve; points without a value are left out."""
    groups: dict[tuple[str, str], list[Series]] = {}
    for r in sorted(runs, key=lambda r: _method_rank(r.method)):
        if not r.curve:
            continue
        label = r.method if r.edit_mode == "sequential" else f"{r.method} ({r.edit_mode})"
        for kind in KINDS:
            pts = [(p.n_edits, p.value(kind, metric)) for p in r.curve if p.value(kind, metric) is not None]
            if pts:
                groups.setdefault((r.model, r.dataset), []).append(
                    Series(label, kind, tuple(n for n, _ in pts), tuple(v for _, v in pts)))
    return groups


def markdown_curves(groups: Mapping[tuple[str, str], Sequence[Series]]) -> str:
    """The curves as tables: one per (model, dataset), a row per method and kind, a column per n."""
    parts = []
    for (model, dataset), series in groups.items():
        ns = sorted({n for s in series for n in s.n_edits})
        parts.append(f"### {model}, {DATASET_TITLES.get(dataset, dataset)}: reliability after n edits\n")
        parts.append("| Method | Eval | " + " | ".join(map(str, ns)) + " |")
        parts.append("|---|---|" + "---:|" * len(ns))
        for s in series:
            at = dict(zip(s.n_edits, s.values))
            kind = "WILD" if s.kind == "wild" else "syn"
            parts.append(f"| {s.method} | {kind} | " + " | ".join(fmt(at.get(n)) for n in ns) + " |")
        parts.append("")
    return "\n".join(parts)


# --- figures --------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the figures need matplotlib: pip install 'mirage_jax[report]' "
                          "(or pass --nofigures for the markdown alone)") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def drop_colormap():
    """White at a 0 % drop to the paper's teal at 100 %."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("drop", ["#ffffff", DROP_COLOUR])


def table_figure(datasets: Sequence[str], rows: Sequence[Row], path: str | Path) -> Path:
    """The table drawn like the paper's figure: WILD Rel / Gen cells shaded by their drop (0-100 %,
    a rise counts as 0), a colour bar beside; the paper's rows in grey italics."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    cmap = drop_colormap()
    # Label columns sized to their longest text, headers included (about 0.14 column widths per
    # character at 8 pt once the colour bar has taken its share; the bold 10 pt header counts as 9).
    model_w = 0.3 + 0.14 * max(9, *(len(r.model) for r in rows))
    label_w, ncols = model_w + 0.3 + 0.14 * max(9, *(len(r.label) for r in rows)), len(datasets) * len(COLUMNS)
    width, height = label_w + ncols, len(rows) + 2
    fig, ax = plt.subplots(figsize=(1.2 + 0.62 * width, 0.6 + 0.3 * height))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.text(0.1, 1.5, "Model", va="center", weight="bold")
    ax.text(model_w, 1.5, "Method", va="center", weight="bold")
    for g, d in enumerate(datasets):
        x0 = label_w + g * len(COLUMNS)
        ax.text(x0 + len(COLUMNS) / 2, 0.5, DATASET_TITLES.get(d, d), ha="center", va="center", weight="bold")
        ax.plot([x0 + 0.1, x0 + len(COLUMNS) - 0.1], [0.95, 0.95], color="black", lw=0.6)
        for j, col in enumerate(COLUMNS):
            ax.text(x0 + j + 0.5, 1.5, col.title.replace(" ", "\n"), ha="center", va="center", fontsize=8)
    ax.plot([0, width], [2, 2], color="black", lw=0.8)
    previous_model = None
    for i, row in enumerate(rows):
        y = 2 + i + 0.5
        style = {"color": "0.4", "style": "italic"} if row.paper else {}
        if row.model != previous_model or row.paper:
            ax.text(0.1, y, row.model, va="center", fontsize=8, **style)
        previous_model = None if row.paper else row.model
        ax.text(model_w, y, row.label, va="center", fontsize=8, **style)
        for g, d in enumerate(datasets):
            for j, col in enumerate(COLUMNS):
                x = label_w + g * len(COLUMNS) + j
                dr = cell_drop(row, d, col)
                if dr is not None:
                    ax.add_patch(Rectangle((x + 0.05, y - 0.42), 0.9, 0.84, color=cmap(min(max(dr, 0.0), 1.0)), lw=0))
                v = row.cells.get((d, col))
                if v is not None:
                    ax.text(x + 0.5, y, fmt(v), ha="center", va="center", fontsize=8, **style)
    ax.plot([0, width], [height, height], color="black", lw=0.8)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 100), cmap), ax=ax, fraction=0.02, pad=0.01)
    bar.set_label("drop syn -> WILD (%)")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_figure(groups: Mapping[tuple[str, str], Sequence[Series]], path: str | Path) -> Path:
    """Reliability against the number of edits: a panel per (model, dataset), a colour per method,
    synthetic dashed, WILD solid, log x."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(s.method for series in groups.values() for s in series))
    colour = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, ((model, dataset), series) in zip(axes[0], groups.items()):
        for s in series:
            ax.plot(s.n_edits, s.values, "-" if s.kind == "wild" else "--", marker="o", color=colour[s.method])
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("number of edits")
        ax.set_ylabel("reliability")
        ax.set_title(f"{model}, {DATASET_TITLES.get(dataset, dataset)}", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour[m], label=m) for m in methods]
    handles += [Line2D([], [], color="black", ls="--", label="synthetic"),
                Line2D([], [], color="black", ls="-", label="WILD")]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# --- the whole report -------------------------------------------------------------------------------


def markdown_report(runs: Sequence[Run], compare: str | None = None, paper_model: str | None = None) -> str:
    """report.md: the table, its legend, the sources with their judges, the curves."""
    datasets, rows = build_table(runs, compare, paper_model)
    parts = ["# Results: synthetic vs WILD evaluation", "", markdown_table(datasets, rows), "", LEGEND]
    if compare == "paper":
        parts.append("Rows marked [paper]: the paper's numbers (spec §6; single editing, GPT-4o-mini judge, "
                     "its 7-8B models) in the cells our row also has.")
    parts += ["", "Sources:", ""]
    for r in runs:
        failed = f", {r.n_failed_edits} failed edits" if r.n_failed_edits else ""
        parts.append(f"- `{r.source}`: {r.method} on {r.model}, {r.dataset}, {r.edit_mode}, "
                     f"n={r.n_samples}{failed}, judge {r.judge}")
    parts.append("")
    for judge in dict.fromkeys(r.judge for r in runs):
        parts.append(judge_line(judge, sum(r.unjudged for r in runs if r.judge == judge)))
    groups = curve_series(runs)
    if groups:
        parts += ["", "## Sequential editing: reliability vs number of edits", "", markdown_curves(groups)]
    return "\n".join(parts).rstrip() + "\n"


def write_report(runs: Sequence[Run], out_dir: str | Path, compare: str | None = None,
                 paper_model: str | None = None, figures: bool = True) -> dict[str, Path]:
    """Write report.md (+ report.png, curves.png) into `out_dir`; returns {what: path}."""
    if not runs:
        raise ReportError("no runs to report")
    text = markdown_report(runs, compare, paper_model)  # checks everything before a file is written
    if figures:
        _pyplot()  # a missing matplotlib is said before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from mirage_jax import io

    written = {"markdown": out / "report.md"}
    io.write_text(written["markdown"], text)
    if figures:
        written["table"] = table_figure(*build_table(runs, compare, paper_model), out / "report.png")
        groups = curve_series(runs)
        if groups:
            written["curves"] = curves_figure(groups, out / "curves.png")
    return written


def end_of_run_text(summary: dict, files: Sequence[str | Path]) -> str:
    """What `launch.py` prints when a run ends: the run's table row, its files, the judge line."""
    run = run_from_summary(summary, str(files[0]) if files else "")
    datasets, rows = build_table([run])
    lines = [markdown_table(datasets, rows), "", LEGEND, ""]
    if run.curve:
        lines += [markdown_curves(curve_series([run])), ""]
    if run.n_failed_edits:
        lines.append(f"{run.n_failed_edits} edits failed and are left out (their rows carry edit.error).")
    lines.append(f"n={run.n_samples}. " + judge_line(run.judge, run.unjudged))
    lines += ["", "Files:", *(f"  {f}" for f in files)]
    out_dir = Path(files[0]).parent if files else Path(".")
    lines.append(f"Figures, and more runs side by side: python -m mirage_jax.report {out_dir} "
                 f"--out={out_dir / 'report'}")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------


def _define_flags() -> None:
    flags.DEFINE_string("out", "report", "directory for report.md, report.png and curves.png")
    flags.DEFINE_enum("compare", None, ["paper"], "put the paper's numbers (spec §6) beside ours")
    flags.DEFINE_enum("paper_model", None, list(PAPER_MODELS),
                      "compare with this paper model (default: the one our model's name matches, if any)")
    flags.DEFINE_bool("figures", True, "draw report.png (and curves.png); needs matplotlib")


def main(argv: Sequence[str]) -> None:
    fv = flags.FLAGS
    if len(argv) < 2:
        raise ReportError("give one or more results directories or files (*_summary.json, results *.jsonl)")
    runs = load_runs(argv[1:])
    written = write_report(runs, fv.out, compare=fv.compare, paper_model=fv.paper_model, figures=fv.figures)
    datasets, rows = build_table(runs, fv.compare, fv.paper_model)
    print(markdown_table(datasets, rows))
    print()
    for path in written.values():
        print(path)


if __name__ == "__main__":
    from absl import app

    from mirage_jax import cli  # noqa: F401  (quiets the start-up noise, like every command)

    _define_flags()
    try:
        app.run(main)
    except ValueError as err:  # ReportError and the runner's own input errors: one line
        sys.exit(f"error: {err}")
