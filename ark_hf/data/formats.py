"""Record layouts accepted on load, and their conversion to the internal form of `ark_hf.data.schema`.

Three layouts are recognised per record, by their keys:

- **ark** (the internal form, FlagEmbedding's jsonl): `{"query", "pos", "neg", "pos_scores", "neg_scores",
  "prompt", "type"}`.
- **ms-swift** embedding format (ms-swift >= 3.9): `{"messages", "positive_messages", "negative_messages"}`.
  The query is the content of the last `user` message of `messages`; a `system` message there becomes the
  record's `prompt` (the query instruction). Each positive/negative is a whole conversation, of which the
  last `user` message is the passage. ms-swift insists on exactly one positive conversation; more are
  accepted here and become several positives. `label`, `images` and other ms-swift fields are ignored.
- **sentence-transformers** columns: `anchor` (or `query`), `positive`, and optionally `negative` and/or
  `negative_1`, `negative_2`, ... (one text per column, negatives in numeric order).

Converted records go through the same validator as ark records, and every issue is reported under the
field name the user wrote: `positive_messages[0][1].content`, `negative_2`, `anchor`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .schema import ValidationIssue, type_name, validate_record

__all__ = [
    "ARK_FORMAT",
    "MS_SWIFT_FORMAT",
    "SENTENCE_TRANSFORMERS_FORMAT",
    "NormalizedRecord",
    "detect_format",
    "normalize_record",
]

ARK_FORMAT = "ark"
MS_SWIFT_FORMAT = "ms-swift"
SENTENCE_TRANSFORMERS_FORMAT = "sentence-transformers"

# Optional internal fields that converted layouts may carry along unchanged.
_PASSTHROUGH_FIELDS = ("pos_scores", "neg_scores", "prompt", "type")
_NEGATIVE_COLUMN = re.compile(r"negative_(\d+)")
_LAYOUTS_HELP = (
    "expected ark {query, pos[, neg, pos_scores, neg_scores, prompt, type]}, "
    "ms-swift {messages, positive_messages[, negative_messages]} "
    "or sentence-transformers {anchor, positive[, negative_1, negative_2, ...]}"
)

# Internal field name -> the user's field name; `None` hides the internal issue because the converter has
# already reported the cause under the original name.
_FieldNames = dict[str, "str | None"]
_Report = Callable[[str, str], None]


class NormalizedRecord(NamedTuple):
    """Result of `normalize_record`: the internal-form record (or `None`), its errors and its warnings."""

    record: dict[str, Any] | None
    errors: list[ValidationIssue]
    warnings: list[ValidationIssue]


def detect_format(obj: Mapping[str, Any]) -> str:
    """Name the layout of one record from its keys (`ark` when nothing else matches, for clear errors)."""
    if "messages" in obj or "positive_messages" in obj:
        return MS_SWIFT_FORMAT
    if "pos" in obj:
        return ARK_FORMAT
    if "anchor" in obj or "positive" in obj:
        return SENTENCE_TRANSFORMERS_FORMAT
    return ARK_FORMAT


def normalize_record(
    obj: Any,
    *,
    source: str,
    line: int,
    source_index: int = 0,
    require_teacher_scores: bool = False,
    record_format: str | None = None,
) -> NormalizedRecord:
    """Convert one parsed record of any accepted layout to the internal form and validate it.

    Args:
        obj: the parsed JSON value or dataset row.
        source, line, source_index, require_teacher_scores: as in `ark_hf.data.schema.validate_record`.
        record_format: the layout, when already known (`detect_format` otherwise).

    Returns:
        A `NormalizedRecord`; issues name the fields as the user wrote them.

    Example:
        >>> normalize_record(
        ...     {"anchor": "q", "positive": "p", "negative_1": "n"}, source="st.jsonl", line=1
        ... ).record["neg"]
        ['n']
    """
    if not isinstance(obj, Mapping):
        return NormalizedRecord(*validate_record(obj, source=source, line=line))
    record_format = record_format or detect_format(obj)
    errors: list[ValidationIssue] = []

    def report(field: str, message: str) -> None:
        errors.append(ValidationIssue(source, line, field, message))

    if record_format == ARK_FORMAT:
        if "query" not in obj and "pos" not in obj:
            # A record with none of the known keys is a layout problem; two "missing field" errors would hide it.
            fields = ", ".join(repr(key) for key in list(obj)[:10]) or "none"
            report("<record>", f"no known training-record fields (found {fields}); {_LAYOUTS_HELP}")
            return NormalizedRecord(None, errors, [])
        internal, field_names = obj, {}
    elif record_format == MS_SWIFT_FORMAT:
        internal, field_names = _from_ms_swift(obj, report)
    elif record_format == SENTENCE_TRANSFORMERS_FORMAT:
        internal, field_names = _from_sentence_transformers(obj, report)
    else:
        raise ValueError(f"unknown record format {record_format!r}")

    record, validation_errors, warnings = validate_record(
        internal,
        source=source,
        line=line,
        require_teacher_scores=require_teacher_scores,
        source_index=source_index,
    )
    for issue in validation_errors:
        field = field_names.get(issue.field, issue.field)
        if field is None:
            continue
        message = issue.message
        if record_format == ARK_FORMAT and issue.field == "pos" and "response" in obj:
            message += (
                " (the record looks like ms-swift's format before v3.9, query/response/rejected_response; "
                "use messages/positive_messages/negative_messages or the ark fields query/pos/neg)"
            )
        errors.append(ValidationIssue(issue.source, issue.line, field, message))
    warnings = [ValidationIssue(w.source, w.line, field_names.get(w.field) or w.field, w.message) for w in warnings]
    return NormalizedRecord(record if not errors else None, errors, warnings)


def _carry_optional_fields(obj: Mapping[str, Any], internal: dict[str, Any]) -> None:
    for field in _PASSTHROUGH_FIELDS:
        if field in obj:
            internal[field] = obj[field]


def _last_user_content(conversation: Any, field: str, report: _Report) -> tuple[Any, str] | None:
    """`(content, path of the content)` of the last user message of a conversation, or `None` after reporting."""
    if not isinstance(conversation, list) or not conversation:
        got = "an empty list" if isinstance(conversation, list) else type_name(conversation)
        hint = ""
        if isinstance(conversation, Mapping):
            hint = " (each entry is a whole conversation, so a message needs one more level of list: [[{...}]])"
        report(field, f"expected a non-empty list of {{role, content}} messages, got {got}{hint}")
        return None
    found: tuple[Any, str] | None = None
    ok = True
    for index, message in enumerate(conversation):
        path = f"{field}[{index}]"
        if not isinstance(message, Mapping):
            report(path, f"expected a {{role, content}} message object, got {type_name(message)}")
            ok = False
            continue
        role = message.get("role")
        if not isinstance(role, str):
            report(f"{path}.role", f"expected a string such as 'user', got {type_name(role)}")
            ok = False
        elif role == "user":
            found = (message.get("content"), f"{path}.content")
    if ok and found is None:
        report(field, "no message with role 'user' (the text used is the content of the last user message)")
    return found if ok else None


def _conversations(obj: Mapping[str, Any], field: str, *, required: bool, report: _Report) -> list[Any] | None:
    """The list of conversations under `field` (empty when optional and absent), or `None` after reporting."""
    value = obj.get(field)
    if field not in obj or (value is None and not required):
        if required:
            report(field, "missing required field")
            return None
        return []
    if not isinstance(value, list) or (required and not value):
        got = "an empty list" if isinstance(value, list) else type_name(value)
        qualifier = "a non-empty" if required else "a"
        report(
            field, f"expected {qualifier} list of conversations (each a list of {{role, content}} messages), got {got}"
        )
        return None
    return value


def _passages(
    obj: Mapping[str, Any], field: str, internal_field: str, *, required: bool, report: _Report
) -> tuple[list[Any] | None, _FieldNames]:
    conversations = _conversations(obj, field, required=required, report=report)
    if conversations is None:
        return None, {internal_field: None}
    texts, field_names = [], {internal_field: field}
    for index, conversation in enumerate(conversations):
        found = _last_user_content(conversation, f"{field}[{index}]", report)
        if found is None:
            return None, {internal_field: None}
        texts.append(found[0])
        field_names[f"{internal_field}[{index}]"] = found[1]
    return texts, field_names


def _first_system_message(messages: Any) -> tuple[Any, str] | None:
    """`(content, path)` of the first system message: ms-swift's instruction, which becomes the `prompt`."""
    if not isinstance(messages, list):
        return None
    for index, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get("role") == "system":
            return message.get("content"), f"messages[{index}].content"
    return None


def _from_ms_swift(obj: Mapping[str, Any], report: _Report) -> tuple[dict[str, Any], _FieldNames]:
    internal: dict[str, Any] = {}
    field_names: _FieldNames = {}
    _carry_optional_fields(obj, internal)

    if "messages" not in obj:
        report("messages", "missing required field")
        field_names["query"] = None
    else:
        query = _last_user_content(obj["messages"], "messages", report)
        if query is None:
            field_names["query"] = None
        else:
            internal["query"], field_names["query"] = query
        system = _first_system_message(obj["messages"])
        if system is not None:
            if obj.get("prompt") is not None:
                report("prompt", "given both here and as a system message in 'messages'; keep one of them")
            else:
                internal["prompt"], field_names["prompt"] = system

    for field, internal_field, required in (
        ("positive_messages", "pos", True),
        ("negative_messages", "neg", False),
    ):
        texts, names = _passages(obj, field, internal_field, required=required, report=report)
        field_names.update(names)
        if texts is not None:
            internal[internal_field] = texts
    return internal, field_names


def _from_sentence_transformers(obj: Mapping[str, Any], report: _Report) -> tuple[dict[str, Any], _FieldNames]:
    internal: dict[str, Any] = {}
    field_names: _FieldNames = {}
    _carry_optional_fields(obj, internal)

    anchor = "anchor" if "anchor" in obj else "query" if "query" in obj else None
    if anchor is None:
        report("anchor", "missing required field (sentence-transformers layout: anchor, positive[, negative_1, ...])")
        field_names["query"] = None
    else:
        internal["query"] = obj[anchor]
        field_names["query"] = anchor

    if "positive" not in obj:
        report("positive", "missing required field")
        field_names["pos"] = None
    else:
        internal["pos"] = [obj["positive"]]
        field_names.update({"pos": "positive", "pos[0]": "positive"})

    # `negative` first, then negative_1, negative_2, ... in numeric order (negative_10 after negative_9).
    columns: list[tuple[int, str]] = []
    for key in obj:
        match = _NEGATIVE_COLUMN.fullmatch(key)
        if key == "negative" or match:
            columns.append((int(match.group(1)) if match else 0, key))
    columns.sort()
    # A dataset whose rows have different numbers of negatives stores the missing ones as null.
    negatives = [key for _, key in columns if obj[key] is not None]
    internal["neg"] = [obj[key] for key in negatives]
    field_names.update({f"neg[{index}]": key for index, key in enumerate(negatives)})
    if isinstance(obj.get("positive"), list):
        # lists of passages are the ark layout under sentence-transformers' names: one line says so, rather
        # than one "expected a string" per column
        renames = [
            f"'{a}' to '{b}'" for a, b in (("positive", "pos"), ("negative", "neg"), ("anchor", "query")) if a in obj
        ]
        report(
            "positive",
            "expected one passage (a string: the sentence-transformers layout has one positive per row), got a "
            f"list; for lists of passages use the ark layout: rename {', '.join(renames)}",
        )
        field_names.update({"pos": None, "pos[0]": None})
        field_names.update({f"neg[{index}]": None for index in range(len(negatives))})
    return internal, field_names
