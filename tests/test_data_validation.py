"""Bad training data: every error names the file, the 1-based line and the field, and all of them are reported.

Each case writes a small jsonl into `tmp_path`, loads it, and checks the exact location string
(`f"{path}:{line}: field '{field}': "`) plus a key phrase of the message, with the bad line placed after valid
(and blank) lines so that line counting is tested too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import pytest

from ark_hf.data.formats import normalize_record
from ark_hf.data.loading import load_training_records
from ark_hf.data.schema import DataValidationError, ValidationIssue, validate_record

GOOD = '{"query": "what is rebar?", "pos": ["Steel bars that reinforce concrete."], "neg": ["A kind of bird."]}'
GOOD_SWIFT = json.dumps(
    {"messages": [{"role": "user", "content": "q"}], "positive_messages": [[{"role": "user", "content": "d+"}]]}
)
GOOD_ST = '{"anchor": "q", "positive": "d+", "negative_1": "d-1", "negative_2": "d-2"}'


def _swift(**fields) -> str:
    record = {
        "messages": [{"role": "user", "content": "q"}],
        "positive_messages": [[{"role": "user", "content": "d+"}]],
    }
    record.update(fields)
    return json.dumps(record)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content, to prove that loading writes nothing."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run from an empty folder inside tmp_path, so a stray relative write would show up in `_files`."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def _write(folder: Path, lines: list[str | bytes], name: str = "train.jsonl") -> Path:
    path = folder / name
    path.write_bytes(b"\n".join(line.encode("utf-8") if isinstance(line, str) else line for line in lines) + b"\n")
    return path


def _load_error(sources, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load_training_records(sources, **kwargs)
    return info.value


# (id, lines, kwargs, bad line, field, key phrase)
BAD_LINES = [
    (
        "invalid-json",
        [GOOD, '{"query": "q", "pos": [}'],
        {},
        2,
        "<json>",
        "invalid JSON: Expecting value at column 24",
    ),
    ("truncated-json", [GOOD, GOOD, '{"query": "q"'], {}, 3, "<json>", "invalid JSON"),
    ("not-an-object", [GOOD, '["q", ["a"]]'], {}, 2, "<record>", "expected a JSON object, got list"),
    ("bare-number", [GOOD, "", "NaN"], {}, 3, "<record>", "expected a JSON object, got float"),
    ("missing-query", [GOOD, '{"pos": ["a"]}'], {}, 2, "query", "missing required field"),
    ("missing-pos", [GOOD, "", '{"query": "q", "neg": ["a"]}'], {}, 3, "pos", "missing required field"),
    ("query-int", [GOOD, '{"query": 5, "pos": ["a"]}'], {}, 2, "query", "expected a non-empty string, got int"),
    ("query-null", ['{"query": null, "pos": ["a"]}'], {}, 1, "query", "expected a non-empty string, got null"),
    ("query-empty", [GOOD, '{"query": "", "pos": ["a"]}'], {}, 2, "query", "got an empty string"),
    ("query-blank", [GOOD, '{"query": "  \\t", "pos": ["a"]}'], {}, 2, "query", "got a whitespace-only string"),
    (
        "pos-str",
        [GOOD, GOOD, '{"query": "q", "pos": "a"}'],
        {},
        3,
        "pos",
        "expected a non-empty list of strings, got str",
    ),
    (
        "pos-null",
        [GOOD, '{"query": "q", "pos": null}'],
        {},
        2,
        "pos",
        "expected a non-empty list of strings, got null",
    ),
    (
        "pos-empty",
        [GOOD, '{"query": "q", "pos": []}'],
        {},
        2,
        "pos",
        "expected a non-empty list of strings, got an empty list",
    ),
    (
        "pos-elem-int",
        [GOOD, '{"query": "q", "pos": ["a", "b", 3]}'],
        {},
        2,
        "pos[2]",
        "expected a non-empty string, got int",
    ),
    ("pos-elem-empty", [GOOD, '{"query": "q", "pos": ["a", ""]}'], {}, 2, "pos[1]", "got an empty string"),
    (
        "neg-str",
        [GOOD, '{"query": "q", "pos": ["a"], "neg": "b"}'],
        {},
        2,
        "neg",
        "expected a list of strings, got str",
    ),
    ("neg-elem-null", [GOOD, '{"query": "q", "pos": ["a"], "neg": [null]}'], {}, 2, "neg[0]", "got null"),
    ("neg-elem-list", [GOOD, '{"query": "q", "pos": ["a"], "neg": ["b", ["c"]]}'], {}, 2, "neg[1]", "got list"),
    (
        "pos-scores-length",
        [GOOD, '{"query": "q", "pos": ["a", "b"], "pos_scores": [0.5]}'],
        {},
        2,
        "pos_scores",
        "has 1 scores but 'pos' has 2 texts",
    ),
    (
        "neg-scores-length",
        [GOOD, '{"query": "q", "pos": ["a"], "pos_scores": [1], "neg": ["b"], "neg_scores": [0.1, 0.2]}'],
        {},
        2,
        "neg_scores",
        "has 2 scores but 'neg' has 1 texts",
    ),
    (
        "scores-not-list",
        [GOOD, '{"query": "q", "pos": ["a"], "pos_scores": 0.9}'],
        {},
        2,
        "pos_scores",
        "expected a list of numbers (one teacher score per text), got float",
    ),
    (
        "score-str",
        [GOOD, '{"query": "q", "pos": ["a"], "pos_scores": ["0.9"]}'],
        {},
        2,
        "pos_scores[0]",
        "expected a number, got str",
    ),
    (
        "score-bool",
        [GOOD, '{"query": "q", "pos": ["a"], "neg": ["b", "c"], "neg_scores": [0.1, true]}'],
        {},
        2,
        "neg_scores[1]",
        "expected a number, got bool",
    ),
    (
        "score-nan",
        [GOOD, '{"query": "q", "pos": ["a"], "pos_scores": [NaN]}'],
        {},
        2,
        "pos_scores[0]",
        "expected a finite number, got nan",
    ),
    (
        "score-inf",
        [GOOD, '{"query": "q", "pos": ["a"], "neg": ["b"], "neg_scores": [-Infinity]}'],
        {},
        2,
        "neg_scores[0]",
        "expected a finite number, got -inf",
    ),
    (
        "teacher-scores-missing",
        ['{"query": "q", "pos": ["a"]}'],
        {"require_teacher_scores": True},
        1,
        "pos_scores",
        "missing, but teacher scores are required (require_teacher_scores=True)",
    ),
    (
        "teacher-scores-only-pos",
        ['{"query": "q", "pos": ["a"], "pos_scores": [3.0], "neg": ["b", "c"]}'],
        {"require_teacher_scores": True},
        1,
        "neg_scores",
        "missing for 2 negative(s), but teacher scores are required (require_teacher_scores=True) "
        "(pos_scores is given)",
    ),
    (
        "teacher-scores-only-neg",
        ['{"query": "q", "pos": ["a"], "neg": ["b"], "neg_scores": [3.0]}'],
        {"require_teacher_scores": True},
        1,
        "pos_scores",
        "teacher scores are required",
    ),
    ("prompt-int", [GOOD, '{"query": "q", "pos": ["a"], "prompt": 1}'], {}, 2, "prompt", "expected a string, got int"),
    (
        "type-list",
        [GOOD, '{"query": "q", "pos": ["a"], "type": ["sts"]}'],
        {},
        2,
        "type",
        "expected a string, got list",
    ),
    (
        "utf8",
        [GOOD, GOOD, b'{"query": "caf\xe9", "pos": ["a"]}'],
        {},
        3,
        "<encoding>",
        "invalid UTF-8 at byte 15 of the line",
    ),
    (
        "unknown-layout",
        [GOOD, '{"q": "x", "a": "y"}'],
        {},
        2,
        "<record>",
        "no known training-record fields (found 'q', 'a')",
    ),
    (
        "old-ms-swift-layout",
        ['{"query": "q", "response": "a"}'],
        {},
        1,
        "pos",
        "missing required field (the record looks like ms-swift's format before v3.9",
    ),
    (
        "mixed-layouts",
        [GOOD, GOOD, "", GOOD_ST],
        {},
        4,
        "<format>",
        "record is in the sentence-transformers layout, but this source's first record (line 1) is in the ark layout",
    ),
    # ms-swift: issues carry the original field names
    (
        "swift-positive-empty",
        [GOOD_SWIFT, _swift(positive_messages=[[{"role": "user", "content": ""}]])],
        {},
        2,
        "positive_messages[0][0].content",
        "expected a non-empty string, got an empty string",
    ),
    (
        "swift-positive-too-shallow",
        [GOOD_SWIFT, _swift(positive_messages=[{"role": "user", "content": "d+"}])],
        {},
        2,
        "positive_messages[0]",
        "one more level of list",
    ),
    (
        "swift-positive-missing",
        [GOOD_SWIFT, '{"messages": [{"role": "user", "content": "q"}]}'],
        {},
        2,
        "positive_messages",
        "missing required field",
    ),
    (
        "swift-positive-empty-list",
        [GOOD_SWIFT, _swift(positive_messages=[])],
        {},
        2,
        "positive_messages",
        "expected a non-empty list of conversations",
    ),
    (
        "swift-no-user",
        [GOOD_SWIFT, _swift(messages=[{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])],
        {},
        2,
        "messages",
        "no message with role 'user'",
    ),
    (
        "swift-role-missing",
        [GOOD_SWIFT, _swift(messages=[{"content": "q"}])],
        {},
        2,
        "messages[0].role",
        "expected a string such as 'user', got null",
    ),
    (
        "swift-negative-content-int",
        [
            GOOD_SWIFT,
            _swift(
                negative_messages=[
                    [{"role": "user", "content": "n"}],
                    [{"role": "system", "content": "s"}, {"role": "user", "content": 7}],
                ]
            ),
        ],
        {},
        2,
        "negative_messages[1][1].content",
        "expected a non-empty string, got int",
    ),
    (
        "swift-negatives-not-list",
        [GOOD_SWIFT, _swift(negative_messages="n")],
        {},
        2,
        "negative_messages",
        "expected a list of conversations",
    ),
    (
        "swift-system-not-str",
        [GOOD_SWIFT, _swift(messages=[{"role": "system", "content": 3}, {"role": "user", "content": "q"}])],
        {},
        2,
        "messages[0].content",
        "expected a string, got int",
    ),
    # sentence-transformers columns
    (
        "st-anchor-int",
        [GOOD_ST, '{"anchor": 1, "positive": "p"}'],
        {},
        2,
        "anchor",
        "expected a non-empty string, got int",
    ),
    (
        "st-positive-missing",
        [GOOD_ST, '{"anchor": "a", "negative": "n"}'],
        {},
        2,
        "positive",
        "missing required field",
    ),
    ("st-anchor-missing", [GOOD_ST, '{"positive": "p"}'], {}, 2, "anchor", "missing required field"),
    (
        "st-negative-empty",
        [GOOD_ST, "", '{"anchor": "a", "positive": "p", "negative_1": "n", "negative_2": " "}'],
        {},
        3,
        "negative_2",
        "got a whitespace-only string",
    ),
    (
        "st-positive-list",
        ['{"query": "a", "positive": ["p1", "p2"]}'],
        {},
        1,
        "positive",
        "got a list; for lists of passages use the ark layout: rename 'positive' to 'pos'",
    ),
]


@pytest.mark.parametrize(
    ("lines", "kwargs", "line", "field", "phrase"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_bad_line_is_located(workdir, lines, kwargs, line, field, phrase):
    path = _write(workdir, lines)
    before = _files(workdir)
    error = _load_error(path, **kwargs)
    message = str(error)
    location = f"{path}:{line}: field '{field}': "
    assert location in message
    issue_line = next(text for text in message.splitlines() if location in text)
    assert phrase in issue_line
    assert len(error.issues) == 1, message
    assert error.issues[0] == ValidationIssue(str(path), line, field, error.issues[0].message)
    assert "1 error in total." in message
    assert _files(workdir) == before


def test_at_least_25_bad_line_cases():
    assert len(BAD_LINES) >= 25


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "file is empty (no records)"),
        ("blank.jsonl", b"\n  \n\r\n", "file is empty (no records)"),
        ("empty.json", b"[]", "file is empty (no records)"),
        (
            "data.csv",
            b"query,pos\n",
            "unsupported file type '.csv'; expected .jsonl or .json (load other formats with `datasets` and pass the "
            "Dataset)",
        ),
    ],
)
def test_file_level_errors_use_line_zero(workdir, name, content, message):
    path = workdir / name
    path.write_bytes(content)
    error = _load_error(path)
    assert f"  {path}: {message}" in str(error).splitlines()
    assert error.issues == [ValidationIssue(str(path), 0, None, message)]


def test_missing_file_and_empty_folder(workdir):
    missing = workdir / "nope" / "train.jsonl"
    folder = workdir / "empty_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not data")
    error = _load_error([missing, folder])
    lines = str(error).splitlines()
    assert f"  {missing}: no such file or folder" in lines
    assert f"  {folder}: folder holds no .jsonl or .json files" in lines
    assert len(error.issues) == 2


def test_json_array_errors(workdir):
    array = workdir / "array.json"
    array.write_text(json.dumps([json.loads(GOOD), {"query": "q", "pos": "a"}, json.loads(GOOD)], indent=2))
    error = _load_error(array)
    # In a JSON array the "line" is the element's 1-based index (pretty-printing makes physical lines meaningless).
    assert f"{array}:2: field 'pos': expected a non-empty list of strings, got str" in str(error)

    broken = workdir / "broken.json"
    broken.write_text('[\n  {"query": "q", "pos": ["a"]},\n  {"query": "q" "pos": ["a"]}\n]\n')
    error = _load_error(broken)
    assert f"{broken}:3: field '<json>': invalid JSON: Expecting ',' delimiter at column 17" in str(error)


def test_all_errors_of_a_file_are_reported_in_order(workdir):
    path = _write(
        workdir,
        [
            '{"query": "", "pos": "a"}',
            GOOD,
            "",
            "{oops",
            '{"query": "q", "pos": ["a", 1], "neg": ["b"], "neg_scores": [NaN, 2]}',
        ],
    )
    error = _load_error(path)
    assert [(issue.line, issue.field) for issue in error.issues] == [
        (1, "query"),
        (1, "pos"),
        (4, "<json>"),
        (5, "pos[1]"),
        (5, "neg_scores"),
        (5, "neg_scores[0]"),
    ]
    assert str(error).splitlines()[0] == "training data failed validation (6 errors):"
    assert str(error).splitlines()[-1] == "6 errors in total."


def test_error_cap_stops_reading(workdir):
    path = _write(workdir, [f'{{"query": "q", "pos": ["a"], "neg_scores": {[0.5] * (i + 1)}}}' for i in range(30)])
    error = _load_error(path, max_errors=5)
    assert [issue.line for issue in error.issues] == [1, 2, 3, 4, 5]
    assert error.stopped_early
    message = str(error)
    assert message.splitlines()[0] == "training data failed validation (more than 5 errors):"
    assert "Stopped after 5 errors (max_validation_errors=5)" in message
    assert "Raise max_validation_errors (--max_validation_errors) to see more" in message
    assert f"{path}:6:" not in message


def test_the_same_error_on_every_line_is_one_error_with_its_lines(workdir):
    path = _write(workdir, ['{"query": "q", "pos": "a"}'] * 30)
    error = _load_error(path, max_errors=5)
    assert len(error.issues) == 1 and not error.stopped_early
    assert "(and 29 more records, lines 2-30)" in str(error.issues[0])

    path = _write(workdir, [f'{{"query": "q", "pos": ["a"], "neg_scores": {[0.5] * (i + 1)}}}' for i in range(30)])
    default = _load_error(path)
    assert len(default.issues) == 20 and default.stopped_early

    exactly = _load_error(path, max_errors=30)
    assert len(exactly.issues) == 30 and not exactly.stopped_early
    assert "30 errors in total." in str(exactly)


def test_errors_across_files_share_one_report_and_one_cap(workdir):
    first = _write(workdir, [GOOD, '{"query": "q", "pos": []}', '{"query": 1, "pos": ["a"]}'], name="a.jsonl")
    second = _write(workdir, ['{"query": "q"}', GOOD, '{"query": "q", "pos": [""]}'], name="b.jsonl")
    before = _files(workdir)
    error = _load_error([first, second])
    message = str(error)
    assert f"{first}:2: field 'pos': expected a non-empty list of strings, got an empty list" in message
    assert f"{first}:3: field 'query': expected a non-empty string, got int" in message
    assert f"{second}:1: field 'pos': missing required field" in message
    assert f"{second}:3: field 'pos[0]': expected a non-empty string, got an empty string" in message
    assert [issue.source for issue in error.issues] == [str(first)] * 2 + [str(second)] * 2

    capped = _load_error([first, second], max_errors=3)
    assert [(issue.source, issue.line) for issue in capped.issues] == [
        (str(first), 2),
        (str(first), 3),
        (str(second), 1),
    ]
    assert capped.stopped_early
    assert _files(workdir) == before


def test_folder_errors_name_each_file(workdir):
    folder = workdir / "data"
    folder.mkdir()
    _write(folder, [GOOD], name="a.jsonl")
    _write(folder, [GOOD, GOOD, '{"query": "q", "pos": ["a"], "neg": "x"}'], name="b.jsonl")
    error = _load_error(folder)
    assert f"{os.path.join(str(folder), 'b.jsonl')}:3: field 'neg': expected a list of strings, got str" in str(error)


def test_negative_equal_to_positive_is_dropped_with_its_score(workdir, caplog):
    path = _write(
        workdir,
        [
            GOOD,
            json.dumps(
                {
                    "query": "q",
                    "pos": ["p1", "p2"],
                    "pos_scores": [9.0, 8.0],
                    "neg": ["p2", "n1", " p1\n", "n2"],
                    "neg_scores": [7.0, 1.0, 6.0, 2.0],
                }
            ),
            '{"query": "q2", "pos": ["x"], "neg": ["x"]}',
        ],
    )
    with caplog.at_level(logging.WARNING, logger="ark_hf.data.loading"):
        records = load_training_records(path)
    assert records[1]["neg"] == ["n1", "n2"]
    assert records[1]["neg_scores"] == [1.0, 2.0]
    assert records[1]["pos"] == ["p1", "p2"] and records[1]["pos_scores"] == [9.0, 8.0]
    assert records[2]["neg"] == [] and records[2]["neg_scores"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path}: dropped 3 negative(s) identical to a positive of the same record (2 records, first at line 2)"
    ]


def test_validate_record_reports_dropped_negatives_as_warnings():
    record, errors, warnings = validate_record(
        {"query": "q", "pos": ["a"], "neg": ["b", "a"], "neg_scores": [1, 2], "extra": {"ignored": True}},
        source="s.jsonl",
        line=4,
        source_index=2,
    )
    assert errors == []
    assert [str(w) for w in warnings] == [
        "s.jsonl:4: field 'neg[1]': identical to a positive of the same record; dropped"
    ]
    assert record == {
        "query": "q",
        "pos": ["a"],
        "neg": ["b"],
        "pos_scores": None,
        "neg_scores": [1.0],
        "prompt": None,
        "type": None,
        "source": "s.jsonl",
        "source_index": 2,
        "line": 4,
        "id": "s.jsonl:4",
    }


def test_converted_layout_warnings_use_original_field_names():
    result = normalize_record(
        {
            "messages": [{"role": "user", "content": "q"}],
            "positive_messages": [[{"role": "user", "content": "d"}]],
            "negative_messages": [[{"role": "user", "content": "x"}], [{"role": "user", "content": "d"}]],
        },
        source="swift.jsonl",
        line=7,
    )
    assert result.errors == []
    assert [str(w) for w in result.warnings] == [
        "swift.jsonl:7: field 'negative_messages[1][0].content': identical to a positive of the same record; dropped"
    ]
    assert result.record["neg"] == ["x"]


def test_dataset_errors_name_the_row(workdir):
    rows = [
        {"query": "q1", "pos": ["a"], "neg": ["b"]},
        {"query": "q2", "pos": ["a"], "neg": ["b"]},
        {"query": "", "pos": ["a"], "neg": [""]},
    ]
    dataset = datasets.Dataset.from_list(rows)
    error = _load_error(dataset)
    assert "dataset:3: field 'query': expected a non-empty string, got an empty string" in str(error)
    assert "dataset:3: field 'neg[0]': expected a non-empty string, got an empty string" in str(error)

    error = _load_error([dataset], source_names=["faq-train"])
    assert "faq-train:3: field 'query'" in str(error)

    # A null negative_1 is a row with fewer negatives, not an error; the second unnamed dataset is `dataset[1]`.
    st_rows = datasets.Dataset.from_dict({"anchor": ["a", "b"], "positive": ["p", "p"], "negative_1": ["n", None]})
    bad_st = datasets.Dataset.from_dict({"anchor": ["a", ""], "positive": ["p", "p"]})
    error = _load_error([st_rows, bad_st])
    assert "dataset[1]:2: field 'anchor': expected a non-empty string, got an empty string" in str(error)
    assert len(error.issues) == 1
    assert list(workdir.rglob("*")) == [workdir / "cwd"]


def test_empty_dataset_is_an_error():
    empty = datasets.Dataset.from_dict({"query": [], "pos": []})
    assert _load_error(empty).issues == [ValidationIssue("dataset", 0, None, "dataset has no rows")]


def test_error_message_truncates_beyond_max_shown():
    issues = [ValidationIssue("f.jsonl", line, "pos", "bad") for line in range(1, 26)]
    message = str(DataValidationError(issues, max_shown=3))
    assert message.splitlines() == [
        "training data failed validation (25 errors):",
        "  f.jsonl:1: field 'pos': bad",
        "  f.jsonl:2: field 'pos': bad",
        "  f.jsonl:3: field 'pos': bad",
        "  ... and 22 more",
        "25 errors in total.",
    ]
    assert isinstance(DataValidationError(issues), ValueError)
    assert str(ValidationIssue("f.jsonl", 0, None, "file is empty")) == "f.jsonl: file is empty"


def test_argument_errors_are_not_data_errors(tmp_path):
    with pytest.raises(TypeError, match="got int"):
        load_training_records(3)
    with pytest.raises(TypeError, match="DatasetDict"):
        load_training_records(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": ["q"]})}))
    with pytest.raises(ValueError, match="no training data sources"):
        load_training_records([])
    with pytest.raises(ValueError, match="max_errors"):
        load_training_records(tmp_path, max_errors=0)
    with pytest.raises(ValueError, match="source_names has 2 names for 1 sources"):
        load_training_records([tmp_path], source_names=["a", "b"])
