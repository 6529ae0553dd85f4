"""Evaluation sets: every layout recognised in one function, `load_eval_set`.

```python
from ark_hf.evaluation.data import load_eval_set

queries, corpus, qrels = load_eval_set("data/scifact")             # a BEIR folder, split "test"
queries, corpus, qrels = load_eval_set("data/scifact", split="dev")
queries, corpus, qrels = load_eval_set("data/dev.json")            # {"queries", "corpus", "qrels"}
queries, corpus, qrels = load_eval_set("data/dev.jsonl")           # training records
```

| layout | recognised by | read as |
|---|---|---|
| JSON object `{"queries": {id: text}, "corpus": {id: text}, "qrels": {qid: {doc_id: relevance}}}` | a `.json` file whose first character is `{` | as written (`ark_hf.evaluation.ir.load_ir_data`) |
| JSON array of training records | a `.json` file whose first character is `[` | `records_to_ir`: corpus = positives and negatives, qrels = positives |
| training records, one per line | `.jsonl` (optionally `.gz`/`.bz2`/`.xz`), or a folder of them | the same |
| BEIR folder | a folder holding `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`; or the path of a `qrels/<split>.tsv` | corpus text = `title` + " " + `text`; the queries that the split's qrels judge |

The trainer (`eval_data`), the preflight checks and `ark-hf eval` all call `load_eval_set`, so a layout that one
of them reads, the others read the same way. Every problem is an `EvalDataError` naming the file, the line or
key, and the layouts an evaluation set may have.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ark_hf.data.schema import DataValidationError, ValidationIssue, type_name
from ark_hf.evaluation.ir import EvalDataError, load_ir_data

logger = logging.get_logger(__name__)

__all__ = ["BEIR_FILES", "EVAL_LAYOUTS", "EvalSet", "load_beir", "load_eval_set"]

EvalSet = tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]
BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels")
EVAL_LAYOUTS = (
    'An evaluation set is one of: a JSON file {"queries": {id: text}, "corpus": {id: text}, '
    '"qrels": {query_id: {doc_id: relevance}}}; a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv; '
    "another split by giving the path of its qrels/<split>.tsv, or split= / --split); or training records (.jsonl, a .json array, or a "
    "folder of them), whose positives are the relevant documents"
)


def load_eval_set(path: str | os.PathLike, *, split: str = "test", max_errors: int = 20) -> EvalSet:
    """Read and validate an evaluation set in any of the layouts of the module docstring.

    Args:
        path: a `.json` / `.jsonl` file, a folder (BEIR or training records), or a BEIR `qrels/<split>.tsv`.
        split: the BEIR qrels split (`qrels/<split>.tsv`); ignored by the other layouts.
        max_errors: how many problems to list before stopping.

    Returns:
        `(queries, corpus, qrels)`: `qid -> text`, `doc_id -> text`, `qid -> {doc_id: relevance}`.

    Raises:
        EvalDataError: a missing path or invalid content, naming the file and line or key, with the layouts an
            evaluation set may have.
    """
    location = os.fspath(path)
    target = Path(location)
    if not target.exists():
        raise EvalDataError(f"{location}: evaluation data: no such file or folder. {EVAL_LAYOUTS}")
    if target.is_file() and target.suffix.lower() == ".tsv" and target.parent.name == "qrels":
        return load_beir(target.parent.parent, split=target.stem, max_errors=max_errors)
    if target.is_dir() and _is_beir_folder(target):
        return load_beir(target, split=split, max_errors=max_errors)
    if target.is_file() and target.name in ("corpus.jsonl", "queries.jsonl") and (target.parent / "qrels").is_dir():
        raise EvalDataError(
            f"{location}: is one file of a BEIR folder; pass the folder {target.parent} (it holds corpus.jsonl, "
            "queries.jsonl and qrels/)"
        )
    if target.is_file() and target.suffix.lower() == ".json" and _first_character(target) == "{":
        return load_ir_data(target, max_errors=max_errors)
    return _from_training_records(location, max_errors=max_errors)


def _is_beir_folder(folder: Path) -> bool:
    return (folder / "corpus.jsonl").is_file() or (folder / "queries.jsonl").is_file() or (folder / "qrels").is_dir()


def _first_character(path: Path) -> str:
    """The first non-blank character of a text file (a UTF-8 byte-order mark skipped), or `""`."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return chr(text[0]) if text else ""


def _from_training_records(location: str, *, max_errors: int) -> EvalSet:
    from ark_hf.data.loading import load_training_records, records_to_ir

    try:
        records = load_training_records(location, max_errors=max_errors)
    except DataValidationError as error:
        raise _eval_error(error.issues, stopped_early=error.stopped_early) from error
    return records_to_ir(records)


def _eval_error(issues: list[ValidationIssue], *, stopped_early: bool = False) -> EvalDataError:
    report = DataValidationError(issues, max_shown=None, stopped_early=stopped_early, what="evaluation data")
    beir_like = any(issue.field in ("<record>", "<format>") and "'_id'" in issue.message for issue in issues)
    hint = " These records look like a BEIR file: pass the folder holding it." if beir_like else ""
    error = EvalDataError(f"{report}\n{EVAL_LAYOUTS}.{hint}")
    error.issues = list(issues)
    return error


# ------------------------------------------------------------------------------------------------- BEIR
def load_beir(folder: str | os.PathLike, *, split: str = "test", max_errors: int = 20) -> EvalSet:
    """Read a BEIR folder: `corpus.jsonl` (`_id`, `text`, optional `title`), `queries.jsonl` (`_id`, `text`) and
    `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header line).

    Only the queries that the split's qrels judge are kept (BEIR's `queries.jsonl` holds every split's queries).
    A document's text is its `title` and `text` joined by a space, as BEIR's own loader and sentence-transformers
    do. Every problem names the file and line: a missing file, a line that is not a JSON object, a missing or
    empty `_id`/`text`, an id given twice, a qrels row without three columns or with a non-integer score, qrels
    naming a query or document that the folder does not hold.

    Raises:
        EvalDataError: listing up to `max_errors` problems.
    """
    root = Path(folder)
    qrels_file = root / "qrels" / f"{split}.tsv"
    issues: list[ValidationIssue] = []
    missing = [str(root / name) for name in ("corpus.jsonl", "queries.jsonl") if not (root / name).is_file()]
    if not qrels_file.is_file():
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        have = f" (the folder has the splits: {', '.join(splits)})" if splits else ""
        missing.append(f"{qrels_file}{have}")
    if missing:
        raise EvalDataError(
            f"{root}: BEIR evaluation folder lacks {'; '.join(missing)}; a BEIR folder holds corpus.jsonl, "
            f"queries.jsonl and qrels/<split>.tsv. {EVAL_LAYOUTS}"
        )
    corpus = _read_beir_texts(root / "corpus.jsonl", issues, with_title=True)
    queries = _read_beir_texts(root / "queries.jsonl", issues, with_title=False)
    qrels = _read_beir_qrels(qrels_file, queries, corpus, issues)
    if not corpus and not issues:
        issues.append(ValidationIssue(str(root / "corpus.jsonl"), 0, None, "is empty; there is nothing to retrieve"))
    if not issues and not any(r > 0 for docs in qrels.values() for r in docs.values()):
        issues.append(ValidationIssue(str(qrels_file), 0, None, "no query has a relevant document (score > 0)"))
    if issues:
        shown = issues[:max_errors]
        raise _eval_error(shown, stopped_early=len(issues) > len(shown))
    judged = {qid: queries[qid] for qid in qrels}
    logger.info("BEIR set %s (split %s): %d queries, %d documents", root, split, len(judged), len(corpus))
    return judged, corpus, qrels


def _beir_lines(path: Path, issues: list[ValidationIssue]) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                issues.append(ValidationIssue(str(path), line, "<encoding>", f"invalid UTF-8 ({error.reason})"))
                continue
            text = text.removeprefix("\ufeff") if line == 1 else text
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as error:
                issues.append(
                    ValidationIssue(str(path), line, "<json>", f"invalid JSON: {error.msg} at column {error.colno}")
                )


def _read_beir_texts(path: Path, issues: list[ValidationIssue], *, with_title: bool) -> dict[str, str]:
    table: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, row in _beir_lines(path, issues):
        location = str(path)
        if not isinstance(row, dict):
            issues.append(ValidationIssue(location, line, "<record>", f"expected a JSON object, got {type_name(row)}"))
            continue
        doc_id = row.get("_id")
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id:
            issues.append(
                ValidationIssue(location, line, "_id", f"expected a non-empty string, got {type_name(doc_id)}")
            )
            continue
        text = row.get("text")
        title = row.get("title") if with_title else None
        if not isinstance(text, str) or (not text.strip() and not (isinstance(title, str) and title.strip())):
            got = "an empty string" if isinstance(text, str) else type_name(text)
            issues.append(ValidationIssue(location, line, "text", f"expected a non-empty string, got {got}"))
            continue
        if doc_id in table:
            issues.append(
                ValidationIssue(location, line, "_id", f"'{doc_id}' given twice (first at line {first_line[doc_id]})")
            )
            continue
        first_line[doc_id] = line
        table[doc_id] = f"{title} {text}".strip() if isinstance(title, str) and title.strip() else text
    return table


def _read_beir_qrels(
    path: Path, queries: dict[str, str], corpus: dict[str, str], issues: list[ValidationIssue]
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if line == 1 and not _is_int(row[-1]):
                continue  # the header line (query-id, corpus-id, score)
            if len(row) != 3:
                issues.append(
                    ValidationIssue(
                        str(path),
                        line,
                        None,
                        f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}",
                    )
                )
                continue
            qid, doc_id, score = (cell.strip() for cell in row)
            if not _is_int(score):
                issues.append(
                    ValidationIssue(str(path), line, "score", f"expected an integer relevance, got {score!r}")
                )
                continue
            if qid not in queries:
                issues.append(ValidationIssue(str(path), line, "query-id", f"'{qid}' is not in queries.jsonl"))
            if doc_id not in corpus:
                issues.append(ValidationIssue(str(path), line, "corpus-id", f"'{doc_id}' is not in corpus.jsonl"))
            qrels.setdefault(qid, {})[doc_id] = int(score)
    return qrels


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()
