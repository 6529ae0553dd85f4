"""The training-record contract and its validator.

Every source of training data (jsonl, JSON, a `datasets.Dataset`, ms-swift or sentence-transformers
layouts) ends up as one internal form, one dict per example:

| key           | type                  | meaning                                                          |
|---------------|-----------------------|------------------------------------------------------------------|
| `query`       | `str`                 | the query (non-empty)                                            |
| `pos`         | `list[str]`           | relevant passages (at least one)                                 |
| `neg`         | `list[str]`           | hard negatives (may be empty: pairs train on in-batch negatives)  |
| `pos_scores`  | `list[float] \\| None` | teacher scores aligned with `pos`                                |
| `neg_scores`  | `list[float] \\| None` | teacher scores aligned with `neg`                                |
| `prompt`      | `str \\| None`         | per-record query instruction (overrides the per-dataset one)     |
| `type`        | `str \\| None`         | task type (retrieval, sts, ...)                                  |
| `source`      | `str`                 | file path or dataset name the record came from                   |
| `source_index`| `int`                 | index of that source among all sources loaded                    |
| `line`        | `int`                 | 1-based physical line (jsonl), array element or dataset row      |
| `id`          | `str`                 | `f"{source}:{line}"`                                             |

`validate_record` checks one parsed object against the contract and reports every problem it finds as a
`ValidationIssue` that names the source, the 1-based line and the field, so a user can jump straight to
it: `data/train.jsonl:17: field 'pos': expected a non-empty list of strings, got str`. Reading files,
other layouts and the error cap live in `ark_hf.data.formats` and `ark_hf.data.loading`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_TEACHER_SCORE",
    "RECORD_FIELDS",
    "DataValidationError",
    "ValidationIssue",
    "type_name",
    "validate_record",
]

# Callback that records one issue: `report(field, message)`.
_Report = Callable[[str, str], None]

# Largest teacher score accepted: rerankers give logits within a few hundred or probabilities; float16 overflows at
# 65504, so anything near that is a bug in the scoring, not a score.
MAX_TEACHER_SCORE = 1e4

# Keys of a validated record, in the order they are built.
RECORD_FIELDS = (
    "query",
    "pos",
    "neg",
    "pos_scores",
    "neg_scores",
    "prompt",
    "type",
    "source",
    "source_index",
    "line",
    "id",
)


@dataclass(frozen=True)
class ValidationIssue:
    """One problem found in the training data, located precisely enough to fix it in an editor.

    Args:
        source: file path (as the user gave it) or dataset name.
        line: 1-based line (jsonl), array element (JSON array) or row (dataset); 0 for problems of the whole
            source (missing file, empty file).
        field: the field at fault, with list indices (`pos[2]`) and the original names of converted layouts
            (`positive_messages[0]`); pseudo-fields in angle brackets for problems above the field level
            (`<json>`, `<encoding>`, `<record>`, `<format>`). `None` for whole-source problems.
        message: what is wrong, phrased as "expected X, got Y" where possible.
    """

    source: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.source}: {self.message}"
        if self.field is None:
            return f"{self.source}:{self.line}: {self.message}"
        return f"{self.source}:{self.line}: field '{self.field}': {self.message}"


class DataValidationError(ValueError):
    """Raised when training data fails validation; carries every issue found, not just the first.

    The message lists the issues one per line (at most `max_shown`, then "... and N more") and the total,
    so a single run shows the user everything to fix.

    Args:
        issues: the problems found, in file order.
        max_shown: how many issues the message spells out (all of them when `None`).
        stopped_early: the loader found more errors than its cap and did not check the rest of the data.
        what: what failed, for the first line (`"evaluation data"` when an evaluation set is read).
    """

    def __init__(
        self,
        issues: Sequence[ValidationIssue],
        *,
        max_shown: int | None = 20,
        stopped_early: bool = False,
        what: str = "training data",
    ) -> None:
        self.issues = list(issues)
        self.stopped_early = stopped_early
        self.what = what
        super().__init__(self._format(max_shown))

    def _format(self, max_shown: int | None) -> str:
        total = len(self.issues)
        shown = self.issues if max_shown is None else self.issues[:max_shown]
        noun = "error" if total == 1 else "errors"
        count = f"more than {total} errors" if self.stopped_early else f"{total} {noun}"
        lines = [f"{self.what} failed validation ({count}):"]
        lines.extend(f"  {issue}" for issue in shown)
        if len(shown) < total:
            lines.append(f"  ... and {total - len(shown)} more")
        if self.stopped_early:
            lines.append(
                f"Stopped after {total} errors (max_validation_errors={total}): the rest of the data was not "
                "checked. Raise max_validation_errors (--max_validation_errors) to see more."
            )
        else:
            lines.append(f"{total} {noun} in total.")
        return "\n".join(lines)


def type_name(value: Any) -> str:
    """JSON-flavoured type name for messages: `null` rather than `NoneType`, `bool` kept apart from numbers."""
    if value is None:
        return "null"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` as a teacher score is a data bug, not the number 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_text(value: Any, field: str, issue: _Report) -> bool:
    """Report `value` unless it is a non-blank string; return whether it is usable."""
    if not isinstance(value, str):
        issue(field, f"expected a non-empty string, got {type_name(value)}")
        return False
    if not value.strip():
        kind = "an empty string" if value == "" else "a whitespace-only string"
        issue(field, f"expected a non-empty string, got {kind}")
        return False
    return True


def _check_texts(obj: Mapping[str, Any], field: str, *, required: bool, issue: _Report) -> list[str] | None:
    """Validate a list of passages; `None` when it is unusable (issues already reported)."""
    if field not in obj:
        if required:
            issue(field, "missing required field")
            return None
        return []
    value = obj[field]
    if value is None and not required:
        return []
    expected = "a non-empty list of strings" if required else "a list of strings"
    if not isinstance(value, list):
        issue(field, f"expected {expected}, got {type_name(value)}")
        return None
    if required and not value:
        issue(field, f"expected {expected}, got an empty list")
        return None
    ok = True
    for index, text in enumerate(value):
        ok &= _check_text(text, f"{field}[{index}]", issue)
    return list(value) if ok else None


def _check_scores(
    obj: Mapping[str, Any], field: str, texts_field: str, texts: list[str] | None, issue: _Report
) -> list[float] | None:
    """Validate teacher scores aligned with `texts`; `None` when absent or unusable."""
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, list):
        issue(field, f"expected a list of numbers (one teacher score per text), got {type_name(value)}")
        return None
    ok = True
    if texts is not None and len(value) != len(texts):
        issue(
            field,
            f"has {len(value)} scores but '{texts_field}' has {len(texts)} texts; "
            f"teacher scores must align one-to-one with '{texts_field}'",
        )
        ok = False
    for index, score in enumerate(value):
        if not _is_number(score):
            issue(f"{field}[{index}]", f"expected a number, got {type_name(score)}")
            ok = False
        elif not math.isfinite(score):
            # json.loads accepts the non-standard tokens NaN and Infinity, so they do reach us.
            issue(f"{field}[{index}]", f"expected a finite number, got {float(score)}")
            ok = False
        elif abs(score) > MAX_TEACHER_SCORE:
            issue(
                f"{field}[{index}]",
                f"teacher score {float(score):g} is out of range (|score| <= {MAX_TEACHER_SCORE:g}): teacher scores "
                "are a reranker's logits or probabilities; a value this large overflows half precision (or, beyond "
                "3.4e38, float32) and turns the loss into NaN. Check how the scores were computed",
            )
            ok = False
    return [float(score) for score in value] if ok else None


def validate_record(
    obj: Any,
    *,
    source: str,
    line: int,
    require_teacher_scores: bool = False,
    source_index: int = 0,
) -> tuple[dict[str, Any] | None, list[ValidationIssue], list[ValidationIssue]]:
    """Check one parsed object in the internal format and build the validated record.

    All problems of the record are reported, not just the first. A negative identical to one of the record's
    positives (compared after stripping surrounding whitespace, since the tokenizer sees the same text) is not
    an error: training on it would push the positive away from the query, so it is dropped together with its
    teacher score and reported as a warning. Fields outside the contract are ignored.

    Args:
        obj: the parsed JSON value (or dataset row) to check.
        source: file path or dataset name, for messages and the record's `source`/`id`.
        line: 1-based line, array element or row.
        require_teacher_scores: the training config distils from precomputed scores, so every record must
            carry `pos_scores`, and `neg_scores` whenever it has negatives.
        source_index: index of the source among those being loaded (stored in the record).

    Returns:
        `(record, errors, warnings)`: `record` is the internal-form dict, or `None` when there are errors.

    Example:
        >>> record, errors, warnings = validate_record(
        ...     {"query": "q", "pos": ["a"], "neg": ["a", "b"]}, source="train.jsonl", line=3
        ... )
        >>> record["neg"], str(warnings[0])
        (['b'], "train.jsonl:3: field 'neg[0]': identical to a positive of the same record; dropped")
    """
    errors: list[ValidationIssue] = []

    def issue(field: str, message: str) -> None:
        errors.append(ValidationIssue(source, line, field, message))

    if not isinstance(obj, Mapping):
        issue("<record>", f"expected a JSON object, got {type_name(obj)}")
        return None, errors, []

    query = obj.get("query")
    if "query" not in obj:
        issue("query", "missing required field")
        query_ok = False
    else:
        query_ok = _check_text(query, "query", issue)
    pos = _check_texts(obj, "pos", required=True, issue=issue)
    neg = _check_texts(obj, "neg", required=False, issue=issue)
    pos_scores = _check_scores(obj, "pos_scores", "pos", pos, issue)
    neg_scores = _check_scores(obj, "neg_scores", "neg", neg, issue)

    if require_teacher_scores:
        if obj.get("pos_scores") is None:
            issue("pos_scores", "missing, but teacher scores are required (require_teacher_scores=True)")
        if neg and obj.get("neg_scores") is None:
            given = " (pos_scores is given)" if obj.get("pos_scores") is not None else ""
            issue(
                "neg_scores",
                f"missing for {len(neg)} negative(s), but teacher scores are required "
                f"(require_teacher_scores=True){given}",
            )

    optional_text: dict[str, str | None] = {}
    for field in ("prompt", "type"):
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            issue(field, f"expected a string, got {type_name(value)}")
        optional_text[field] = value

    if errors or not query_ok or pos is None or neg is None:
        return None, errors, []

    warnings: list[ValidationIssue] = []
    positives = {text.strip() for text in pos}
    kept = [index for index, text in enumerate(neg) if text.strip() not in positives]
    for index in sorted(set(range(len(neg))) - set(kept)):
        warnings.append(
            ValidationIssue(source, line, f"neg[{index}]", "identical to a positive of the same record; dropped")
        )
    record = {
        "query": query,
        "pos": pos,
        "neg": [neg[index] for index in kept],
        "pos_scores": pos_scores,
        "neg_scores": None if neg_scores is None else [neg_scores[index] for index in kept],
        "prompt": optional_text["prompt"],
        "type": optional_text["type"],
        "source": source,
        "source_index": source_index,
        "line": line,
        "id": f"{source}:{line}",
    }
    return record, [], warnings
