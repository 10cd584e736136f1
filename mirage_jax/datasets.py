"""QAEdit / ZsRE / CounterFact files -> edit requests.

Every loader reads one JSON file (a list of records), keeps the first `ds_size` records (the
seed's `--ds_size K`: slice first, then use), and turns each record into an `EditRequest`.
Strings are kept exactly as they are in the file: QAEdit has targets with stray whitespace or a
trailing " *" ("Wilt Chamberlain *") and the paper evaluates against them verbatim, so any
cleaning is the caller's decision, not the loader's.

What the seed does differently (spec section 0 / 1.1 / 7):
* QAEdit keeps all five locality pairs (the seed uses only the first one).
* A record with a missing or empty required field is an error naming the file, the record index
  and the field; `skip_bad=True` skips it and reports (index, reason) instead.
* The subject is *not* required to occur in the prompt here: only methods that locate the
  subject need that, and they check it themselves (spec 7.29).
* `case_id` is the record's 0-based index in the file, as in the seed's output (spec 1.6). The
  dataset's own ids (QAEdit `id`, CounterFact `case_id`) are not kept.

Required fields per format (anything else is optional; an optional field that is present must
still be a non-empty string of the right shape):

| format | prompt | subject | target_new | rephrase | locality |
|---|---|---|---|---|---|
| qaedit | `prompt` | `subject` | `target` | `rephrase` | `locality[k].loc` / `.loc_ans` |
| zsre (MEND) | `src` | `subject` | `alt` | `rephrase` | `loc` / `loc_ans` |
| counterfact, flat | `prompt` | `subject` | `target_new` | `rephrase_prompt` | `locality_prompt` / `locality_ground_truth` |
| counterfact, ROME | `requested_rewrite.prompt` % subject | `.subject` | `.target_new.str` | `paraphrase_prompts[0]` | `neighborhood_prompts[k]` / `.target_true.str` |

ZsRE note: in the MEND-format files the locality question `loc` starts with the literal prefix
"nq question: " (it comes from Natural Questions). It is kept as is, so a WILD evaluation asks
the model "nq question: who ..."; strip it yourself if that is not what you want.
"""  # noqa: E501  (the markdown table above is read whole)

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATASET_NAMES = ("demo", "qaedit", "zsre", "counterfact")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # shipped with the repository (data/README.md)
# What `--dataset=<name>` reads without `--data_path`. ZsRE is not shipped (its licence is unclear).
SHIPPED = {"demo": "demo_edits.json", "qaedit": "QAEdit_inter_1k.json", "counterfact": "counterfact-edit.json"}
ZSRE_HINT = ("ZsRE is not shipped with mirage_jax (its licence is unclear): download zsre_mend_eval.json "
             "(MEND's ZsRE evaluation split, 19,086 records; e.g. from the MEND / ROME data releases) and "
             "pass --data_path=<that file>")


class DatasetError(ValueError):
    """An edit dataset file cannot be used: unreadable, wrong shape, or a bad record."""

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.path = path  # the file, when the error is about one
        self.index = index  # 0-based record index in the file, when about one record
        self.field = field  # the offending field (dotted / indexed), when about one field


@dataclasses.dataclass(frozen=True)
class LocalityPair:
    """An unrelated question and its answer; the edit should not change the model's reply."""

    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit: make the model answer `prompt` (about `subject`) with `target_new`."""

    case_id: int  # 0-based index of the record in its file
    prompt: str  # the edit question / cloze, subject included
    subject: str  # the entity the edit is about (ROME/MEMIT locate its last token)
    target_new: str  # the new answer, verbatim from the file
    ground_truth: str | None  # the old answer where the dataset has one (CounterFact, ZsRE)
    rephrase: str | None  # a paraphrase of `prompt` (generalisation)
    locality: tuple[LocalityPair, ...]  # unrelated questions with their answers
    source: str | None  # where the record comes from (QAEdit: 'NQ', 'TQA', 'SQA'), if known


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
    """The result of a loader: the usable requests and the records skipped with `skip_bad`."""

    name: str  # 'qaedit', 'zsre' or 'counterfact'
    path: str
    requests: tuple[EditRequest, ...]
    skipped: tuple[tuple[int, str], ...]  # (record index, reason); empty unless skip_bad


class _BadField(Exception):
    """Internal: raised while converting one record; becomes a DatasetError or a skip."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


_MISSING = object()


def _get(record: dict, field: str) -> Any:
    return record.get(field, _MISSING) if isinstance(record, dict) else _MISSING


def _required_str(record: dict, field: str, name: str | None = None) -> str:
    """`record[field]` as a non-empty string; `name` is how the field is reported."""
    name = name or field
    value = _get(record, field)
    if value is _MISSING or value is None:
        raise _BadField(name, "missing")
    if not isinstance(value, str):
        raise _BadField(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadField(name, "empty")
    return value


def _optional_str(record: dict, field: str, name: str | None = None) -> str | None:
    """None when absent or null; otherwise it must be a non-empty string."""
    value = _get(record, field)
    if value is _MISSING or value is None:
        return None
    return _required_str(record, field, name)


def _required_dict(record: dict, field: str, name: str | None = None) -> dict:
    name = name or field
    value = _get(record, field)
    if value is _MISSING or value is None:
        raise _BadField(name, "missing")
    if not isinstance(value, dict):
        raise _BadField(name, f"must be an object, got {type(value).__name__}")
    return value


def _optional_list(record: dict, field: str) -> list | None:
    value = _get(record, field)
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, list):
        raise _BadField(field, f"must be a list, got {type(value).__name__}")
    return value


def _qaedit_request(record: dict, index: int) -> EditRequest:
    locality = []
    for k, pair in enumerate(_optional_list(record, "locality") or ()):
        if not isinstance(pair, dict):
            raise _BadField(f"locality[{k}]", f"must be an object, got {type(pair).__name__}")
        locality.append(LocalityPair(
            prompt=_required_str(pair, "loc", f"locality[{k}].loc"),
            answer=_required_str(pair, "loc_ans", f"locality[{k}].loc_ans"),
        ))
    return EditRequest(
        case_id=index,
        prompt=_required_str(record, "prompt"),
        subject=_required_str(record, "subject"),
        target_new=_required_str(record, "target"),
        ground_truth=None,  # QAEdit records carry only the new target
        rephrase=_optional_str(record, "rephrase"),
        locality=tuple(locality),
        source=_optional_str(record, "source"),
    )


def _zsre_request(record: dict, index: int) -> EditRequest:
    loc, loc_ans = _optional_str(record, "loc"), _optional_str(record, "loc_ans")
    if (loc is None) != (loc_ans is None):
        raise _BadField("loc_ans" if loc_ans is None else "loc", "missing (the other one is set)")
    answers = _optional_list(record, "answers") or []
    ground_truth = None
    if answers:
        if not isinstance(answers[0], str) or not answers[0].strip():
            raise _BadField("answers[0]", "must be a non-empty string")
        ground_truth = answers[0]
    return EditRequest(
        case_id=index,
        prompt=_required_str(record, "src"),
        subject=_required_str(record, "subject"),
        target_new=_required_str(record, "alt"),
        ground_truth=ground_truth,
        rephrase=_optional_str(record, "rephrase"),
        locality=() if loc is None else (LocalityPair(loc, loc_ans),),
        source=None,
    )


def _counterfact_flat_request(record: dict, index: int) -> EditRequest:
    loc = _optional_str(record, "locality_prompt")
    loc_ans = _optional_str(record, "locality_ground_truth")
    if (loc is None) != (loc_ans is None):
        missing = "locality_ground_truth" if loc_ans is None else "locality_prompt"
        raise _BadField(missing, "missing (the other locality field is set)")
    return EditRequest(
        case_id=index,
        prompt=_required_str(record, "prompt"),
        subject=_required_str(record, "subject"),
        target_new=_required_str(record, "target_new"),
        ground_truth=_optional_str(record, "ground_truth"),
        rephrase=_optional_str(record, "rephrase_prompt"),
        locality=() if loc is None else (LocalityPair(loc, loc_ans),),
        source=None,
    )


def _counterfact_rome_request(record: dict, index: int) -> EditRequest:
    """ROME's nested form; the prompt template holds the subject as '{}'."""
    rewrite = _required_dict(record, "requested_rewrite")
    template = _required_str(rewrite, "prompt", "requested_rewrite.prompt")
    subject = _required_str(rewrite, "subject", "requested_rewrite.subject")
    if template.count("{}") != 1:
        raise _BadField("requested_rewrite.prompt", "must contain the subject placeholder '{}' once")
    target_new = _required_str(_required_dict(rewrite, "target_new", "requested_rewrite.target_new"),
                               "str", "requested_rewrite.target_new.str")
    target_true = _get(rewrite, "target_true")
    ground_truth = None
    if target_true is not _MISSING and target_true is not None:
        ground_truth = _required_str(_required_dict(rewrite, "target_true",
                                                    "requested_rewrite.target_true"),
                                     "str", "requested_rewrite.target_true.str")
    paraphrases = _optional_list(record, "paraphrase_prompts") or []
    neighbours = _optional_list(record, "neighborhood_prompts") or []
    for field, texts in (("paraphrase_prompts", paraphrases), ("neighborhood_prompts", neighbours)):
        for k, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise _BadField(f"{field}[{k}]", "must be a non-empty string")
    if neighbours and ground_truth is None:
        # Neighbourhood prompts share the *true* object; without it they have no answer.
        raise _BadField("requested_rewrite.target_true", "missing (needed by neighborhood_prompts)")
    return EditRequest(
        case_id=index,
        prompt=template.replace("{}", subject),
        subject=subject,
        target_new=target_new,
        ground_truth=ground_truth,
        rephrase=paraphrases[0] if paraphrases else None,
        locality=tuple(LocalityPair(text, ground_truth) for text in neighbours),
        source=None,
    )


def _counterfact_request(record: dict, index: int) -> EditRequest:
    if isinstance(record, dict) and "requested_rewrite" in record:
        return _counterfact_rome_request(record, index)
    return _counterfact_flat_request(record, index)


def read_records(path: str | Path) -> list:
    """The records of an edit dataset file: a JSON list, or JSONL (one JSON object per line, e.g.
    a `datasets.Dataset.to_json` export of the full 19k QAEdit). JSONL is recognised by its suffix
    (`.jsonl`, `.ndjson`) or by content (several top-level values); record i is the
    i-th non-blank line, and a bad line is named by its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read edit dataset: {e.strerror or e}", path=str(path)) from e
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _jsonl_records(path, text)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines
            return _jsonl_records(path, text)
        raise DatasetError(f"{path}: not valid JSON: {e}", path=str(path)) from e
    if not isinstance(records, list):  # one object is a mistake here, a one-record file only as .jsonl
        raise DatasetError(f"{path}: expected a JSON list of records (or JSON lines), got {type(records).__name__}",
                           path=str(path))
    return records


def _jsonl_records(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {lineno} (record {len(records)}): not valid JSON: {e}",
                               path=str(path), index=len(records)) from e
    return records


def _load(name: str, convert: Callable[[dict, int], EditRequest], path: str | Path,
          ds_size: int | None, skip_bad: bool) -> LoadedDataset:
    if ds_size is not None and (isinstance(ds_size, bool) or not isinstance(ds_size, int)
                                or ds_size < 0):
        raise DatasetError(f"ds_size must be None or a non-negative int, got {ds_size!r}")
    records = read_records(path)
    if ds_size is not None:
        records = records[:ds_size]
    requests, skipped = [], []
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise _BadField("<record>", f"must be an object, got {type(record).__name__}")
            requests.append(convert(record, index))
        except _BadField as bad:
            reason = f"field '{bad.field}': {bad.reason}"
            if not skip_bad:
                raise DatasetError(f"{path}: record {index}: {reason}", path=str(path),
                                   index=index, field=bad.field) from None
            skipped.append((index, reason))
    return LoadedDataset(name=name, path=str(path), requests=tuple(requests),
                         skipped=tuple(skipped))


def load_qaedit(path: str | Path, ds_size: int | None = None,
                skip_bad: bool = False) -> LoadedDataset:
    """QAEdit (prompt, subject, target, rephrase, locality[k]{loc, loc_ans}); all pairs kept."""
    return _load("qaedit", _qaedit_request, path, ds_size, skip_bad)


def load_zsre(path: str | Path, ds_size: int | None = None,
              skip_bad: bool = False) -> LoadedDataset:
    """ZsRE in MEND's format (src, alt, rephrase, subject, loc, loc_ans, answers).

    `loc` starts with "nq question: " in MEND's files; it is kept verbatim (see module doc).
    """
    return _load("zsre", _zsre_request, path, ds_size, skip_bad)


def load_counterfact(path: str | Path, ds_size: int | None = None,
                     skip_bad: bool = False) -> LoadedDataset:
    """CounterFact, in the paper's flat form or ROME's nested form (decided per record)."""
    return _load("counterfact", _counterfact_request, path, ds_size, skip_bad)


# "demo" is our own set in the QAEdit schema.
_LOADERS = {"demo": load_qaedit, "qaedit": load_qaedit, "zsre": load_zsre, "counterfact": load_counterfact}


def load_dataset(name: str, path: str | Path | None = None, ds_size: int | None = None,
                 skip_bad: bool = False) -> LoadedDataset:
    """Load edit dataset `name` (one of DATASET_NAMES) from `path` (default: the copy in `data/`)."""
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    loaded = _LOADERS[name](path if path is not None else default_path(name), ds_size=ds_size, skip_bad=skip_bad)
    return dataclasses.replace(loaded, name=name)


def default_path(name: str) -> Path:
    """The file `--dataset=<name>` reads without `--data_path`: the copy shipped in `data/`."""
    if name == "zsre":
        raise DatasetError(ZSRE_HINT)
    if name not in SHIPPED:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    path = DATA_DIR / SHIPPED[name]
    if not path.exists():
        raise DatasetError(f"{path}: the shipped {name} file is missing (data/ comes with the repository: "
                           "install from a clone, or pass --data_path)", path=str(path))
    return path


def demo_path() -> Path:
    """Our own ten-record QAEdit-format demo set (well-known facts, counterfactual targets)."""
    return DATA_DIR / SHIPPED["demo"]
