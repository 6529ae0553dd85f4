"""Input records of the alignment scorer, read and checked before any model loads.

One JSON object per line:

| key          | type        | meaning                                                                |
|--------------|-------------|------------------------------------------------------------------------|
| `query`      | `str`       | the question (non-empty)                                                |
| `answers`    | `list[str]` | optional; `answers[0]` is the forward score's target. Empty or absent: |
|              |             | no forward score, and the backward score is UPR's                      |
| `pos`, `neg` | `list[str]` | candidate chunks (ark_hf's training layout), or                        |
| `candidates` | `list[str]` | candidate chunks in one list                                           |

Every problem is reported as `file:line: field 'x': ...` (`ark_hf.data.schema.ValidationIssue`), all of them
at once, in a `DataValidationError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ark_hf.data.schema import DataValidationError, ValidationIssue, type_name

__all__ = ["AlignmentRecord", "CANDIDATE_FIELDS", "iter_jsonl", "read_alignment_records"]

CANDIDATE_FIELDS = ("pos", "neg", "candidates")


@dataclass
class AlignmentRecord:
    """One question and its candidates; `fields` names where each candidate came from (`pos`, `neg`, `candidates`)."""

    index: int
    line: int
    raw: dict[str, Any]
    query: str
    answer: str | None
    chunks: list[str]
    fields: list[str]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, int, str]]:
    """`(record_index, line_number, text)` for each non-blank line (record indices count from 0)."""
    index = 0
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield index, number, text
                index += 1


def _check(obj: Any, source: str, line: int, issues: list[ValidationIssue]) -> None:
    def issue(field: str, message: str) -> None:
        issues.append(ValidationIssue(source, line, field, message))

    if not isinstance(obj, dict):
        issue("<record>", f"expected a JSON object, got {type_name(obj)}")
        return
    query = obj.get("query")
    answers = obj.get("answers")
    if not isinstance(query, str) or not query.strip():
        hint = " (a record needs a question; without an answer only the backward score is computed)"
        issue("query", f"expected a non-empty string, got {type_name(query)}{hint if not answers else ''}")
    if answers is not None:
        if not isinstance(answers, list):
            issue("answers", f"expected a list of strings, got {type_name(answers)}")
        else:
            for j, answer in enumerate(answers):
                if not isinstance(answer, str) or not answer.strip():
                    issue(f"answers[{j}]", f"expected a non-empty string, got {type_name(answer)}")
    present = [f for f in CANDIDATE_FIELDS if f in obj]
    if "candidates" in present and len(present) > 1:
        issue("candidates", "give the chunks either as 'candidates' or as 'pos'/'neg', not both")
    total = 0
    for field in present:
        chunks = obj[field]
        if not isinstance(chunks, list):
            issue(field, f"expected a list of strings, got {type_name(chunks)}")
            continue
        for j, chunk in enumerate(chunks):
            if not isinstance(chunk, str):
                issue(f"{field}[{j}]", f"expected a string, got {type_name(chunk)}")
            elif not chunk.strip():
                issue(f"{field}[{j}]", "expected a non-empty string, got an empty one")
        total += len(chunks)
    if not present:
        issue("candidates", "no candidate chunks: expected 'pos'/'neg' or 'candidates'")
    elif total == 0:
        issue(present[0], "the candidate list is empty: nothing to score")


def read_alignment_records(
    path: str | Path, start: int = 0, end: int | None = None, *, max_errors: int = 20
) -> list[AlignmentRecord]:
    """Parse and check the records `start <= index < end` of a jsonl file; raise `DataValidationError` on any problem."""
    source = str(path)
    if not Path(path).is_file():
        raise DataValidationError([ValidationIssue(source, 0, None, "file not found")])
    issues: list[ValidationIssue] = []
    records: list[AlignmentRecord] = []
    for index, number, text in iter_jsonl(path):
        if index < start:
            continue
        if end is not None and index >= end:
            break
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as error:
            issues.append(
                ValidationIssue(source, number, "<json>", f"invalid JSON: {error.msg} (column {error.colno})")
            )
            continue
        before = len(issues)
        _check(obj, source, number, issues)
        if len(issues) >= max_errors:
            raise DataValidationError(issues, stopped_early=True)
        if len(issues) > before:
            continue
        fields = [f for f in CANDIDATE_FIELDS if f in obj for _ in obj[f]]
        chunks = [chunk for f in CANDIDATE_FIELDS if f in obj for chunk in obj[f]]
        answers = obj.get("answers") or []
        records.append(
            AlignmentRecord(index, number, obj, obj["query"], answers[0] if answers else None, chunks, fields)
        )
    if issues:
        raise DataValidationError(issues)
    return records
