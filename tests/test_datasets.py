import json
from pathlib import Path

import pytest

from mirage_jax.datasets import (
    DATASET_NAMES,
    DatasetError,
    EditRequest,
    LocalityPair,
    demo_path,
    load_counterfact,
    load_dataset,
    load_qaedit,
    load_zsre,
)

DATA = Path(__file__).resolve().parents[1] / "data"  # shipped with the repository
QAEDIT = DATA / "QAEdit_inter_1k.json"
COUNTERFACT = DATA / "counterfact-edit.json"


def _write(tmp_path, records, name="edits.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _qaedit_record(i=0, **overrides):
    record = {"id": 100 + i, "source": "NQ", "prompt": f"who wrote book {i}?",
              "target": f" Author {i} ", "subject": f"book {i}", "rephrase": f"book {i} author?",
              "locality": [{"loc": f"q{i}.{k}", "loc_ans": f"a{i}.{k}"} for k in range(5)]}
    record.update(overrides)
    return record


def test_qaedit_shipped_file():
    loaded = load_dataset("qaedit")  # no path: the copy in data/
    assert loaded.path == str(QAEDIT) and loaded.name == "qaedit"
    assert len(loaded.requests) == 1000 and loaded.skipped == ()
    assert all(len(r.locality) == 5 for r in loaded.requests)
    first = loaded.requests[0]
    assert first.case_id == 0 and first.source == "NQ"
    assert first.target_new == "Wilt Chamberlain *"  # kept verbatim, stray " *" included
    assert first.locality[3] == LocalityPair("when did the us host the world cup", "1994")
    assert first.ground_truth is None
    assert {r.source for r in loaded.requests} == {"NQ", "TQA", "SQA"}
    assert [r.case_id for r in loaded.requests] == list(range(1000))
    # 15 targets carry surrounding whitespace in the file; none is stripped.
    assert sum(r.target_new != r.target_new.strip() for r in loaded.requests) == 15


def test_counterfact_shipped_file():
    loaded = load_dataset("counterfact")
    assert loaded.path == str(COUNTERFACT)
    assert len(loaded.requests) == 10000
    first = loaded.requests[0]
    assert first == EditRequest(
        case_id=0, prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
        target_new="English", ground_truth="French",
        rephrase="Where Danielle Darrieux is from, people speak the language of",
        locality=(LocalityPair("Michel Rocard is a native speaker of", "French"),), source=None)


def test_ds_size_keeps_first_records():
    loaded = load_dataset("counterfact", COUNTERFACT, ds_size=7)
    assert [r.case_id for r in loaded.requests] == list(range(7))
    assert load_qaedit(QAEDIT, ds_size=0).requests == ()


def test_broken_record_names_file_index_and_field(tmp_path):
    records = [_qaedit_record(i) for i in range(4)]
    records[2]["target"] = ""
    del records[3]["locality"][1]["loc_ans"]
    path = _write(tmp_path, records)
    with pytest.raises(DatasetError) as err:
        load_qaedit(path)
    assert str(path) in str(err.value) and "record 2" in str(err.value)
    assert "'target'" in str(err.value) and "empty" in str(err.value)
    assert (err.value.index, err.value.field) == (2, "target")

    loaded = load_qaedit(path, skip_bad=True)
    assert [r.case_id for r in loaded.requests] == [0, 1]
    assert [index for index, _ in loaded.skipped] == [2, 3]
    assert "locality[1].loc_ans" in loaded.skipped[1][1] and "missing" in loaded.skipped[1][1]
    # ds_size slices before validating: the broken records are not read.
    assert len(load_qaedit(path, ds_size=2).requests) == 2


@pytest.mark.parametrize("field, value, reason", [
    ("prompt", None, "missing"), ("subject", "   ", "empty"), ("target", 1994, "must be a string"),
    ("rephrase", "", "empty"), ("locality", "q?", "must be a list"),
])
def test_bad_field_kinds(tmp_path, field, value, reason):
    path = _write(tmp_path, [_qaedit_record(0, **{field: value})])
    with pytest.raises(DatasetError, match=reason) as err:
        load_qaedit(path)
    assert err.value.field == field and err.value.path == str(path)


def test_optional_fields_may_be_absent(tmp_path):
    record = _qaedit_record(0)
    for field in ("rephrase", "locality", "source", "id"):
        del record[field]
    (request,) = load_qaedit(_write(tmp_path, [record])).requests
    assert request.rephrase is None and request.locality == () and request.source is None
    assert request.target_new == " Author 0 "


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="cannot read"):
        load_qaedit(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_zsre(bad)
    with pytest.raises(DatasetError, match="JSON list"):
        load_counterfact(_write(tmp_path, {"prompt": "x"}))
    with pytest.raises(DatasetError, match="record 1: field '<record>'"):
        load_qaedit(_write(tmp_path, [_qaedit_record(0), "oops"]))
    with pytest.raises(DatasetError, match="ds_size"):
        load_qaedit(_write(tmp_path, []), ds_size=-1)


def test_unknown_dataset_name_lists_valid_ones(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("True", tmp_path / "x.json")  # the seed's --datatype default
    assert all(name in str(err.value) for name in DATASET_NAMES)


def test_counterfact_rome_nested_form(tmp_path):
    record = {
        "case_id": 7,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Second paraphrase"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Moulin spoke"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    }
    flat = {"case_id": 8, "prompt": "Paris is in", "subject": "Paris", "target_new": "Italy",
            "ground_truth": "France", "rephrase_prompt": "Paris lies in",
            "locality_prompt": "Lyon is in", "locality_ground_truth": "France"}
    loaded = load_dataset("counterfact", _write(tmp_path, [record, flat]))
    nested, plain = loaded.requests
    assert nested.prompt == "The mother tongue of Danielle Darrieux is"
    assert (nested.subject, nested.target_new, nested.ground_truth) == (
        "Danielle Darrieux", "English", "French")
    assert nested.rephrase == "Shayna does this. Danielle Darrieux speaks"
    assert nested.locality == (LocalityPair("Michel Rocard is a native speaker of", "French"),
                               LocalityPair("Jean Moulin spoke", "French"))
    assert plain.case_id == 1 and plain.locality == (LocalityPair("Lyon is in", "France"),)

    record["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    del record["requested_rewrite"]["target_new"]["str"]
    with pytest.raises(DatasetError, match=r"requested_rewrite\.prompt"):
        load_counterfact(_write(tmp_path, [record]))
    loaded = load_counterfact(_write(tmp_path, [flat, record]), skip_bad=True)
    assert len(loaded.requests) == 1 and loaded.skipped[0][0] == 1


def test_zsre_mend_form(tmp_path):
    record = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
              "pred": "Trinity College", "rephrase": "What university did Watts Humphrey go to?",
              "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
              "loc": "nq question: nearest metro station to siddhivinayak temple in mumbai",
              "loc_ans": "Dadar", "cond": "Trinity College >> University of Michigan || ..."}
    (request,) = load_dataset("zsre", _write(tmp_path, [record])).requests
    assert request.prompt == record["src"] and request.target_new == "University of Michigan"
    assert request.ground_truth == "Illinois Institute of Technology"
    assert request.rephrase == record["rephrase"]
    # The MEND files' "nq question: " prefix is kept as is.
    assert request.locality == (LocalityPair(record["loc"], "Dadar"),)
    del record["alt"]
    with pytest.raises(DatasetError, match="record 0: field 'alt': missing"):
        load_zsre(_write(tmp_path, [record]))


def test_demo_set_is_valid_and_counterfactual():
    loaded = load_qaedit(demo_path())
    assert 8 <= len(loaded.requests) <= 10
    for request in loaded.requests:
        assert request.prompt.count(request.subject) == 1
        assert request.rephrase and len(request.locality) == 5
    capital = loaded.requests[0]
    assert (capital.prompt, capital.subject, capital.target_new) == (
        "What is the capital of France?", "France", "Lyon")


def test_demo_is_the_default_set_and_zsre_is_not_shipped():
    demo = load_dataset("demo")
    assert demo.path == str(demo_path()) and demo.name == "demo" and len(demo.requests) == 10
    with pytest.raises(DatasetError, match=r"ZsRE is not shipped.*--data_path"):
        load_dataset("zsre")


@pytest.mark.parametrize("fmt", ["qaedit", "zsre", "counterfact"])
def test_jsonl_is_read_like_a_json_list(tmp_path, fmt):
    """One record per line (a `Dataset.to_json` export of the full QAEdit, say) gives the same
    requests as the JSON list, for every format, with any file suffix."""
    records = {
        "qaedit": [_qaedit_record(i) for i in range(3)],
        "zsre": [{"subject": f"s{i}", "src": f"What is s{i}?", "pred": "p", "rephrase": f"s{i} is?", "alt": f"a{i}",
                  "answers": ["p"], "loc": "nq question: q", "loc_ans": "la", "cond": "c"} for i in range(3)],
        "counterfact": [{"prompt": f"The language of s{i} is", "subject": f"s{i}", "target_new": "English",
                         "ground_truth": "French", "rephrase_prompt": f"s{i} speaks",
                         "locality_prompt": "X speaks", "locality_ground_truth": "German"} for i in range(3)],
    }[fmt]
    listed = load_dataset(fmt, _write(tmp_path, records))
    lines = "\n".join(json.dumps(r) for r in records) + "\n\n"  # a trailing blank line is fine
    for name in ("edits.jsonl", "edits.json", "edits.txt"):
        (tmp_path / name).write_text(lines, encoding="utf-8")
        assert load_dataset(fmt, tmp_path / name).requests == listed.requests
    (tmp_path / "one.jsonl").write_text(json.dumps(records[0]) + "\n", encoding="utf-8")
    assert load_dataset(fmt, tmp_path / "one.jsonl").requests == listed.requests[:1]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(_qaedit_record(0)) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"edits\.jsonl: line 3 \(record 1\): not valid JSON") as err:
        load_qaedit(path)
    assert err.value.index == 1
    bad_field = tmp_path / "bad.jsonl"
    bad_field.write_text("\n".join(json.dumps(_qaedit_record(i, target="" if i == 1 else "x")) for i in range(2)))
    with pytest.raises(DatasetError, match=r"record 1: field 'target': empty"):
        load_qaedit(bad_field)


# --- the shared ZsRE file (../shared/data, present where CI runs; its README: source, licence, quirks) ---

SHARED_ZSRE = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_eval_first1000.json"


@pytest.fixture(scope="module")
def zsre_raw():
    if not SHARED_ZSRE.exists():
        pytest.skip(f"{SHARED_ZSRE} not present")
    return json.loads(SHARED_ZSRE.read_text(encoding="utf-8"))


def test_zsre_shared_first_20_records(zsre_raw):
    """The first 20 records of MEND's ZsRE eval split become requests field for field (checked
    against the raw JSON): the question `src`, the new answer `alt` (not the model's `pred`), the
    gold `answers[0]` as the old answer, one "nq question: ..." locality pair, strings verbatim."""
    loaded = load_dataset("zsre", SHARED_ZSRE, ds_size=20)
    assert loaded.name == "zsre" and loaded.skipped == () and len(loaded.requests) == 20
    for i, (req, rec) in enumerate(zip(loaded.requests, zsre_raw[:20])):
        # The file's own cross-check of three fields: the edit turns `pred` into `alt` for `src`.
        assert rec["cond"] == f"{rec['pred']} >> {req.target_new} || {req.prompt}"
        assert req == EditRequest(case_id=i, prompt=rec["src"], subject=rec["subject"], target_new=rec["alt"],
                                  ground_truth=rec["answers"][0], rephrase=rec["rephrase"],
                                  locality=(LocalityPair(rec["loc"], rec["loc_ans"]),), source=None)
        assert req.locality[0].prompt.startswith("nq question: ")
    first = loaded.requests[0]
    assert (first.prompt, first.target_new, first.ground_truth) == (
        "What university did Watts Humphrey attend?", "University of Michigan", "Illinois Institute of Technology")


def test_zsre_shared_empty_new_answers_stop_or_are_skipped(zsre_raw):
    """Records 54 and 103 have an empty `alt` (empty in the source too): an error naming the first
    one by default; with skip_bad both are skipped and reported, the others keep their file index."""
    assert [i for i, rec in enumerate(zsre_raw) if not rec["alt"]] == [54, 103]
    with pytest.raises(DatasetError, match=r"record 54: field 'alt': empty") as err:
        load_zsre(SHARED_ZSRE)
    assert (err.value.index, err.value.field) == (54, "alt")
    loaded = load_dataset("zsre", SHARED_ZSRE, skip_bad=True)
    assert [i for i, _ in loaded.skipped] == [54, 103]
    assert all("field 'alt'" in reason for _, reason in loaded.skipped)
    ids = [r.case_id for r in loaded.requests]
    assert len(ids) == 998 and ids == [i for i in range(1000) if i not in (54, 103)]
    assert all(r.target_new == zsre_raw[r.case_id]["alt"] and r.prompt == zsre_raw[r.case_id]["src"]
               for r in loaded.requests)
