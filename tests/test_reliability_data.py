"""No data silently lost (class 4) and evaluation data validated like training data (class 5)."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
from pathlib import Path

import pytest

from ark_hf import DataValidationError
from ark_hf.data.loading import load_training_records
from ark_hf.evaluation.ir import EvalDataError, load_ir_data
from ark_hf.utils.cli import ConfigError
from ark_hf.utils.preflight import check_dataset_instructions


def rows(prefix: str, n: int) -> list[dict]:
    return [{"query": f"{prefix} q{i}", "pos": [f"{prefix} p{i}"]} for i in range(n)]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    """7 records: 2 top-level, 2 in a sub-folder, 2 gzip-compressed, 1 bz2 in a sub-sub-folder."""
    folder = tmp_path / "data"
    (folder / "nq" / "deep").mkdir(parents=True)
    (folder / "top.jsonl").write_bytes(jsonl(rows("top", 2)))
    (folder / "nq" / "part.jsonl").write_bytes(jsonl(rows("nq", 2)))
    with gzip.open(folder / "shard-0.jsonl.gz", "wb") as handle:
        handle.write(jsonl(rows("gz", 2)))
    (folder / "nq" / "deep" / "arr.json.bz2").write_bytes(bz2.compress(json.dumps(rows("bz", 1)).encode()))
    (folder / "notes.md").write_text("# not data")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "hidden.jsonl").write_bytes(jsonl(rows("hidden", 1)))
    return folder


# -------------------------------------------------------------------------------------------- folders
def test_folder_recursion_and_compressed_shards_load_every_record(data_folder, caplog):
    with caplog.at_level(logging.INFO, logger="ark_hf.data.loading"):
        records = load_training_records(data_folder)
    assert sorted(r["query"] for r in records) == sorted(
        [f"top q{i}" for i in range(2)] + [f"nq q{i}" for i in range(2)] + [f"gz q{i}" for i in range(2)] + ["bz q0"]
    )
    sources = {os.path.relpath(r["source"], data_folder) for r in records}
    assert sources == {"top.jsonl", "nq/part.jsonl", "shard-0.jsonl.gz", "nq/deep/arr.json.bz2"}
    text = caplog.text
    # the per-file report: what was read from each file, and what was skipped and why
    assert f"{data_folder / 'nq' / 'part.jsonl'}: 2 records" in text
    assert f"{data_folder / 'shard-0.jsonl.gz'}: 2 records" in text
    assert "skipped 2 entries" in text and "notes.md" in text and ".cache/" in text


def test_dangling_symlink_in_a_folder_is_an_error(data_folder):
    link = data_folder / "gone.jsonl"
    link.symlink_to(data_folder / "deleted.jsonl")
    with pytest.raises(DataValidationError) as error:
        load_training_records(data_folder)
    assert f"{link}: broken symbolic link" in str(error.value)


def test_dangling_symlink_given_directly_is_named(tmp_path):
    link = tmp_path / "train.jsonl"
    link.symlink_to(tmp_path / "missing.jsonl")
    with pytest.raises(DataValidationError, match=f"{link}: broken symbolic link"):
        load_training_records(link)


def test_truncated_gzip_shard_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    blob = gzip.compress(jsonl(rows("x", 200)))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataValidationError) as error:
        load_training_records(path)
    assert f"{path}:" in str(error.value) and "truncated or corrupt" in str(error.value)


# ------------------------------------------------------------------------------------- duplicate keys
@pytest.mark.parametrize(
    ("line_text", "field"),
    [
        ('{"query": "a", "pos": ["p"], "query": "b"}', "query"),
        ('{"query": "a", "pos": ["p"], "neg": ["n"], "neg": ["m"]}', "neg"),
        ('{"messages": [{"role": "user", "role": "system", "content": "x"}], "positive_messages": [[]]}',
         "messages[0].role"),
    ],
)  # fmt: skip
def test_duplicate_json_key_is_an_error_naming_the_line(tmp_path, line_text, field):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "ok", "pos": ["p"]}) + "\n" + line_text + "\n")
    with pytest.raises(DataValidationError) as error:
        load_training_records(path)
    assert f"{path}:2: field '{field}': key given twice in one object" in str(error.value)


def test_duplicate_key_in_a_json_array_names_the_element(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"query": "a", "pos": ["p"]}, {"query": "b", "pos": ["p"], "pos": ["q"]}]')
    with pytest.raises(DataValidationError, match=rf"{path}:2: field 'pos': key given twice"):
        load_training_records(path)


# -------------------------------------------------------------------------------------- unknown fields
@pytest.mark.parametrize(
    ("extra", "suggestion"),
    [({"negatives": ["n"]}, "neg"), ({"positives": ["x"]}, "pos"), ({"pos_score": [1.0]}, "pos_scores")],
)
def test_misspelt_field_is_listed_once_per_file_with_did_you_mean(tmp_path, caplog, extra, suggestion):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl([{**r, **extra} for r in rows("a", 5)]))
    with caplog.at_level(logging.WARNING, logger="ark_hf.data.loading"):
        records = load_training_records(path)
    assert len(records) == 5
    warnings = [r.message for r in caplog.records if "ignored field" in r.message]
    assert len(warnings) == 1  # once per file, not once per record
    (key,) = extra
    assert f"'{key}' (5 records, first at line 1) (did you mean '{suggestion}'?)" in warnings[0]
    assert str(path) in warnings[0]


def test_known_fields_raise_no_warning(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl([{**r, "neg": ["n"], "prompt": "Represent: "} for r in rows("a", 3)]))
    with caplog.at_level(logging.WARNING, logger="ark_hf.data.loading"):
        load_training_records(path)
    assert not [r for r in caplog.records if "ignored field" in r.message]


# ---------------------------------------------------------------------------------- dataset_instructions
def test_instruction_key_matching_no_file_is_refused_with_the_file_names(tmp_path):
    a, b = tmp_path / "msmarco.jsonl", tmp_path / "nq.jsonl"
    a.write_bytes(jsonl(rows("a", 2)))
    b.write_bytes(jsonl(rows("b", 2)))
    records = load_training_records([a, b])
    check_dataset_instructions(records, {"msmarco": "x", "nq.jsonl": "y", str(a): "z"})  # all three forms match
    with pytest.raises(ConfigError) as error:
        check_dataset_instructions(records, {"msmarco": "x", "ms_marco": "y"})
    assert "key 'dataset_instructions': 'ms_marco'" in str(error.value)
    assert str(a) in str(error.value) and str(b) in str(error.value)


# ------------------------------------------------------------------------------------------ eval data
def write_eval(tmp_path: Path, data, raw: str | None = None) -> str:
    path = tmp_path / "dev.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    return str(path)


GOOD = {
    "queries": {"q1": "what is a permit"},
    "corpus": {"d1": "a permit is", "d2": "other"},
    "qrels": {"q1": {"d1": 1}},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"qrels": {"q1": {"d1": 1, "d9": 1}}}, "key 'qrels.q1': names document 'd9' that is not in 'corpus'"),
        ({"qrels": {"q1": {"d1": 1}, "q7": {"d1": 1}}}, "key 'qrels.q7': names a query that is not in 'queries'"),
        ({"corpus": {}, "qrels": {"q1": {}}}, "key 'corpus': is empty"),
        ({"qrels": [["q1", "d1", 1]]}, "key 'qrels': expected an object"),
        ({"qrels": {"q1": ["d1"]}}, "key 'qrels.q1': expected an object {doc_id: relevance}, got list"),
        ({"queries": {"q1": 42}}, "key 'queries.q1': expected a non-empty string, got int"),
        ({"corpus": {"d1": "", "d2": "x"}}, "key 'corpus.d1': expected a non-empty string, got an empty string"),
        ({"qrels": {"q1": {"d1": "yes"}}}, "key 'qrels.q1.d1': expected an integer relevance, got str"),
        ({"qrels": {"q1": {"d1": 0}}}, "key 'qrels': no query has a relevant document"),
    ],
)
def test_eval_data_errors_name_file_and_key(tmp_path, change, expected):
    path = write_eval(tmp_path, {**GOOD, **change})
    with pytest.raises(EvalDataError) as error:
        load_ir_data(path)
    assert f"{path}: {expected}" in str(error.value)


def test_eval_data_duplicate_key_and_bad_json(tmp_path):
    raw = '{"queries": {"q1": "a", "q1": "b"}, "corpus": {"d1": "x"}, "qrels": {"q1": {"d1": 1}}}'
    with pytest.raises(EvalDataError, match=r"key 'queries.q1': given twice"):
        load_ir_data(write_eval(tmp_path, None, raw))
    with pytest.raises(EvalDataError, match=r"dev.json:2: invalid JSON"):
        load_ir_data(write_eval(tmp_path, None, '{"queries": {},\n  "corpus": }'))


def test_good_eval_data_loads(tmp_path):
    queries, corpus, qrels = load_ir_data(write_eval(tmp_path, GOOD))
    assert queries == GOOD["queries"] and corpus == GOOD["corpus"] and qrels == {"q1": {"d1": 1}}
