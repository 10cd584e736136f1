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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QAEDIT = SHARED_DATA / "QAEdit_inter_1k.json"
COUNTERFACT = SHARED_DATA / "counterfact-edit.json"
needs_shared = pytest.mark.skipif(not (QAEDIT.exists() and COUNTERFACT.exists()),
                                  reason="../shared/data not present")


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


@needs_shared
def test_qaedit_shared_file():
    loaded = load_dataset("qaedit", QAEDIT)
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


@needs_shared
def test_counterfact_shared_file():
    loaded = load_counterfact(COUNTERFACT)
    assert len(loaded.requests) == 10000
    first = loaded.requests[0]
    assert first == EditRequest(
        case_id=0, prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
        target_new="English", ground_truth="French",
        rephrase="Where Danielle Darrieux is from, people speak the language of",
        locality=(LocalityPair("Michel Rocard is a native speaker of", "French"),), source=None)


@needs_shared
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
