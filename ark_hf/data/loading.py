"""Load training data from files, folders and `datasets.Dataset`s, validating all of it before training starts.

```python
from ark_hf.data.loading import load_training_records

records = load_training_records(["data/msmarco.jsonl", "data/nq/"], require_teacher_scores=True)
```

Every source is read and checked before anything is returned, and all problems (up to `max_errors`) are
raised together as one `DataValidationError`, each naming the file, the 1-based line and the field:

```
training data failed validation (2 errors):
  data/msmarco.jsonl:17: field 'pos': expected a non-empty list of strings, got str
  data/nq/train.jsonl:3: field 'neg_scores': has 4 scores but 'neg' has 3 texts; ...
```

so a run never dies hours in on line 4,000,017, and nothing is written before the data passes. Files are
streamed line by line: only the validated records stay in memory, never the raw file.
"""

from __future__ import annotations

import bz2
import codecs
import difflib
import gzip
import hashlib
import json
import lzma
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from transformers.utils import logging

from .formats import ARK_FORMAT, MS_SWIFT_FORMAT, SENTENCE_TRANSFORMERS_FORMAT, detect_format, normalize_record
from .schema import DataValidationError, ValidationIssue

if TYPE_CHECKING:  # pragma: no cover
    import datasets

logger = logging.get_logger(__name__)

__all__ = ["DATA_FILE_SUFFIXES", "TrainingSource", "load_training_records", "missing_path_hint", "records_to_ir"]

DATA_FILE_SUFFIXES = (".jsonl", ".json")
# compressed shards (`train.jsonl.gz`) are read through the standard library's decompressors
COMPRESSED_SUFFIXES: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# top-level fields each layout reads; other fields are ignored and listed once per file
_KNOWN_FIELDS = {
    ARK_FORMAT: frozenset({"query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type"}),
    MS_SWIFT_FORMAT: frozenset(
        {"messages", "positive_messages", "negative_messages", "pos_scores", "neg_scores", "prompt", "type"}
    ),
    SENTENCE_TRANSFORMERS_FORMAT: frozenset(
        {"anchor", "query", "positive", "negative", "pos_scores", "neg_scores", "prompt", "type"}
    ),
}
# fields of the layouts' own tools that carry nothing for retrieval training: ignored without a word
_SILENTLY_IGNORED = {MS_SWIFT_FORMAT: frozenset({"label", "images", "videos", "audios", "tools", "objects"})}
# common spellings of the contract's fields
_FIELD_ALIASES = {
    "negatives": "neg", "negative": "neg", "negs": "neg", "hard_negatives": "neg", "positives": "pos",
    "positive": "pos", "passages": "pos", "question": "query", "queries": "query", "q": "query",
    "pos_score": "pos_scores", "neg_score": "neg_scores", "instruction": "prompt", "task": "type",
}  # fmt: skip
# `datasets` names a dataset after the loader that built it when it has no better name; "json" would make
# every locally loaded dataset look like the same source.
_GENERIC_DATASET_NAMES = frozenset({"json", "csv", "parquet", "arrow", "text", "generator", "pandas", "sql"})

TrainingSource = Union[str, os.PathLike, "datasets.Dataset", "datasets.IterableDataset"]


@dataclass(frozen=True)
class _Source:
    """One source after folders are expanded: a file or a dataset."""

    location: str  # what issues name: the path as the user spelled it, or the dataset name
    name: str  # the records' `source` (differs from `location` only when `source_names` is given)
    path: Path | None = None
    dataset: Any = None


class _IssueCollector:
    """Keeps the first `max_errors` distinct errors and notes whether there were more (then loading stops).

    The same problem in many records of one file (same field, same message: a layout mistake made on every
    line) is one error that counts its repeats, so the message says it once with the lines it covers, and the
    other problems of the data still fit under the cap.
    """

    def __init__(self, max_errors: int) -> None:
        self.max_errors = max_errors
        self.overflowed = False
        self._errors: list[ValidationIssue] = []
        self._repeats: dict[tuple[str, str | None, str], list[int]] = {}

    def add(self, issue: ValidationIssue) -> None:
        key = (issue.source, issue.field, issue.message)
        if issue.line and key in self._repeats:
            self._repeats[key].append(issue.line)
        elif len(self._errors) < self.max_errors:
            self._errors.append(issue)
            if issue.line:
                self._repeats[key] = []
        else:
            self.overflowed = True

    @property
    def has_errors(self) -> bool:
        return bool(self._errors)

    @property
    def errors(self) -> list[ValidationIssue]:
        """The errors, each repeated one saying in how many more records (and which lines) it recurs."""
        out = []
        for issue in self._errors:
            lines = self._repeats.get((issue.source, issue.field, issue.message)) or []
            if lines:
                span = f"line {lines[0]}" if len(lines) == 1 else f"lines {lines[0]}-{lines[-1]}"
                noun = "record" if len(lines) == 1 else "records"
                issue = ValidationIssue(
                    issue.source, issue.line, issue.field, f"{issue.message} (and {len(lines)} more {noun}, {span})"
                )
            out.append(issue)
        return out


def load_training_records(
    sources: TrainingSource | Sequence[TrainingSource],
    *,
    require_teacher_scores: bool = False,
    max_errors: int = 20,
    source_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read, convert and validate training records from any mix of files, folders and datasets.

    Accepted sources:

    | source                                 | read as                                                    |
    |----------------------------------------|------------------------------------------------------------|
    | `*.jsonl` path                         | one JSON object per line; `line` = physical line           |
    | `*.json` path                          | a JSON array (read whole; `line` = element index + 1)      |
    |                                        | or JSON Lines content (`line` = physical line)             |
    | `*.jsonl.gz`, `.json.bz2`, `.jsonl.xz` | the same, decompressed while streaming                     |
    | folder                                 | every data file in it and its sub-folders, sorted by path; |
    |                                        | other files and hidden entries are skipped and reported    |
    | `datasets.Dataset` / `IterableDataset` | one record per row; `line` = 1-based row                   |
    | list or tuple of the above             | each in turn                                               |

    Each record may use the ark layout (`query`, `pos`, ...), ms-swift's embedding layout or
    sentence-transformers columns (see `ark_hf.data.formats`); one source must use one layout. Blank lines
    are skipped, a UTF-8 byte-order mark is tolerated. A key given twice in one JSON object is an error
    naming the line; fields outside the layout are ignored and listed once per file in a warning, with a "did
    you mean" (`negatives` -> `neg`). A broken symbolic link is an error. What was read from each file, and
    what was skipped and why, is logged (info level; skipped files as a warning).

    Args:
        sources: a source or a list of sources.
        require_teacher_scores: every record must carry `pos_scores` (and `neg_scores` when it has
            negatives), as distillation from precomputed scores needs.
        max_errors: how many errors to collect before giving up; the rest of the data is then not read.
        source_names: names for the records' `source` field (and ids), one per entry of `sources`; a folder's
            files become `"{name}/{file name}"`. Defaults: the path as given, or the dataset's name
            (`"dataset"` when it has none, `"dataset[i]"` when several have none). Error messages keep naming
            files by their path, so that they can be opened.

    Returns:
        Records in the internal form of `ark_hf.data.schema`, in source order. `source_index` counts the sources
        after folders are expanded, since every file is its own source (for same-source batches and
        per-source instructions).

    Raises:
        DataValidationError: with every issue found (up to `max_errors`). Paths are checked before any file is
            read, so missing files are reported first. Negatives identical to a positive are not errors: they
            are dropped, with their teacher scores, and counted in a logged warning.
        TypeError / ValueError: for arguments that are not data sources at all.
    """
    if max_errors < 1:
        raise ValueError(f"max_errors must be >= 1, got {max_errors}")
    resolved, issues = _resolve_sources(sources, source_names)
    collector = _IssueCollector(max_errors)
    for issue in issues:
        collector.add(issue)

    records: list[dict[str, Any]] = []
    report: list[str] = []
    for source_index, source in enumerate(resolved):
        if collector.overflowed:
            break
        before = len(records)
        _load_source(source, source_index, records, collector, require_teacher_scores=require_teacher_scores)
        report.append(f"  {source.location}: {len(records) - before} records")

    if collector.errors:
        raise DataValidationError(collector.errors, max_shown=None, stopped_early=collector.overflowed)
    logger.info("Loaded %d training records from %d sources:\n%s", len(records), len(resolved), "\n".join(report))
    return records


def records_to_ir(
    records: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """Turn training records into an IR evaluation set `(queries, corpus, qrels)`.

    The corpus holds every distinct positive and negative text; ids are content hashes (`"q"` / `"d"` + the
    first 12 hex digits of SHA-1), so they are stable across runs and identical texts share one id. Records
    with the same query text become one query whose relevant documents are the union of their positives.
    A text that is a positive of a query is relevant to it even if another record lists it as a negative.

    Args:
        records: records in the internal form (only `query`, `pos` and `neg` are read).

    Returns:
        `queries` (qid -> text), `corpus` (pid -> text), `qrels` (qid -> {pid: 1}).
    """
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for record in records:
        qid = _text_id("q", record["query"], queries)
        relevant = qrels.setdefault(qid, {})
        for text in record["pos"]:
            relevant[_text_id("d", text, corpus)] = 1
        for text in record.get("neg") or []:
            _text_id("d", text, corpus)
    return queries, corpus, qrels


def _text_id(prefix: str, text: str, table: dict[str, str]) -> str:
    """Content-hash id of `text`, registered in `table`."""
    text_id = prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    known = table.setdefault(text_id, text)
    if known != text:
        # 48 bits make this astronomically unlikely; fail loudly rather than merge two texts.
        raise ValueError(f"id collision between two different texts ({text_id}); please report this")
    return text_id


def _is_dataset(obj: Any) -> bool:
    # Only something built with `datasets` can be one of its datasets, so don't import the library otherwise.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, (datasets.Dataset, datasets.IterableDataset))


def _is_dataset_dict(obj: Any) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict))


def _dataset_name(dataset: Any) -> str | None:
    name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return name if name and name not in _GENERIC_DATASET_NAMES else None


def _as_list(sources: Any) -> list[Any]:
    if isinstance(sources, (str, os.PathLike)) or _is_dataset(sources):
        return [sources]
    if _is_dataset_dict(sources):
        raise TypeError("got a DatasetDict; pass one split of it, e.g. `dataset['train']`")
    if isinstance(sources, (list, tuple)):
        return list(sources)
    raise TypeError(
        "training data sources must be paths, datasets.Dataset objects or a list of them, "
        f"got {type(sources).__name__}"
    )


def _resolve_sources(sources: Any, source_names: Sequence[str] | None) -> tuple[list[_Source], list[ValidationIssue]]:
    """Expand folders, check that paths exist and name every source; path problems become issues."""
    items = _as_list(sources)
    if not items:
        raise ValueError("no training data sources given")
    if source_names is not None and len(source_names) != len(items):
        raise ValueError(f"source_names has {len(source_names)} names for {len(items)} sources")
    unnamed_datasets = sum(1 for item in items if _is_dataset(item) and _dataset_name(item) is None)

    resolved: list[_Source] = []
    issues: list[ValidationIssue] = []
    for index, item in enumerate(items):
        name = source_names[index] if source_names is not None else None
        if _is_dataset(item):
            default = _dataset_name(item) or ("dataset" if unnamed_datasets == 1 else f"dataset[{index}]")
            resolved.append(_Source(location=name or default, name=name or default, dataset=item))
            continue
        if _is_dataset_dict(item):
            raise TypeError(f"sources[{index}] is a DatasetDict; pass one split of it, e.g. `dataset['train']`")
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"sources[{index}]: expected a path or a datasets.Dataset, got {type(item).__name__}")
        location = os.fspath(item)
        path = Path(location)
        if path.is_symlink() and not path.exists():
            issues.append(ValidationIssue(location, 0, None, f"broken symbolic link (to {os.readlink(path)})"))
        elif path.is_dir():
            files, problems = _folder_files(location)
            issues.extend(problems)
            if not files and not problems:
                issues.append(ValidationIssue(location, 0, None, "folder holds no .jsonl or .json files"))
            for file_location, relative in files:
                file_name = f"{name}/{relative}" if name is not None else file_location
                resolved.append(_Source(location=file_location, name=file_name, path=Path(file_location)))
        elif not path.exists():
            issues.append(ValidationIssue(location, 0, None, f"no such file or folder{missing_path_hint(path)}"))
        elif _data_suffix(path) is None:
            issues.append(
                ValidationIssue(
                    location,
                    0,
                    None,
                    f"unsupported file type '{path.suffix or path.name}'; expected .jsonl or .json "
                    "(load other formats with `datasets` "
                    "and pass the Dataset)",
                )
            )
        else:
            resolved.append(_Source(location=location, name=name if name is not None else location, path=path))
    return resolved, issues


def missing_path_hint(path: str | os.PathLike) -> str:
    """`" (did you mean 'data/train.jsonl'?)"` naming the closest entry of a missing path's folder, or `""`."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        return ""
    names = [entry.name for entry in folder.iterdir() if not entry.name.startswith(".")]
    close = difflib.get_close_matches(target.name, names, n=1, cutoff=0.6)
    return f" (did you mean '{folder / close[0]}'?)" if close else ""


def _data_suffix(path: Path) -> tuple[str, str | None] | None:
    """`(".jsonl" | ".json", compression suffix or None)` for a data file name, else None."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in DATA_FILE_SUFFIXES:
        return suffixes[-1], None
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSED_SUFFIXES and suffixes[-2] in DATA_FILE_SUFFIXES:
        return suffixes[-2], suffixes[-1]
    return None


def _folder_files(location: str) -> tuple[list[tuple[str, str]], list[ValidationIssue]]:
    """Data files under a folder, recursively, sorted by relative path: `[(path, relative path)]`.

    Hidden entries (`.cache/`, `.tmp-*`) and files that are not data are skipped and reported in a warning;
    broken symbolic links are errors. Symbolic links to folders are followed once (no loops).
    """
    files: list[tuple[str, str]] = []
    issues: list[ValidationIssue] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(location, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        skipped.extend(os.path.relpath(os.path.join(root, d), location) + "/" for d in dirs if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for entry in sorted(names):
            full = os.path.join(root, entry)
            relative = os.path.relpath(full, location)
            if os.path.islink(full) and not os.path.exists(full):
                issues.append(ValidationIssue(full, 0, None, f"broken symbolic link (to {os.readlink(full)})"))
            elif entry.startswith(".") or _data_suffix(Path(entry)) is None:
                skipped.append(relative)
            else:
                files.append((full, relative))
    files.sort(key=lambda pair: pair[1])
    if skipped:
        shown = ", ".join(skipped[:10]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 10 else "")
        logger.warning(
            "%s: skipped %d entr%s that are not data files (.jsonl/.json, optionally %s) or are hidden: %s",
            location,
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            "/".join(COMPRESSED_SUFFIXES),
            shown,
        )
    return files, issues


def _load_source(
    source: _Source,
    source_index: int,
    records: list[dict[str, Any]],
    collector: _IssueCollector,
    *,
    require_teacher_scores: bool,
) -> None:
    """Validate one source, appending its records (while no error has been seen anywhere) and its issues."""
    rows = _iter_dataset(source.dataset) if source.path is None else _iter_file(source.path, source.location)
    first_layout: tuple[str, int] | None = None
    num_rows = 0
    dropped_negatives = 0
    records_with_dropped: list[int] = []
    unknown_fields: Counter[str] = Counter()
    first_unknown_line: dict[str, int] = {}
    for line, row in rows:
        if collector.overflowed:
            return
        num_rows += 1
        if isinstance(row, ValidationIssue):
            collector.add(row)
            continue
        if isinstance(row, Mapping):
            duplicates = _duplicate_keys(row)
            if duplicates:
                for field, first_value in duplicates:
                    collector.add(
                        ValidationIssue(
                            source.location,
                            line,
                            field,
                            f"key given twice in one object (the first value was {_preview(first_value)}); "
                            "keep one of them",
                        )
                    )
                continue
            layout = detect_format(row)
            if first_layout is None:
                first_layout = (layout, line)
            elif layout != first_layout[0]:
                collector.add(
                    ValidationIssue(
                        source.location,
                        line,
                        "<format>",
                        f"record is in the {layout} layout, but this source's first record "
                        f"(line {first_layout[1]}) is in the {first_layout[0]} layout; use one layout per source",
                    )
                )
                continue
            for key in _unknown_fields(row, layout):
                unknown_fields[key] += 1
                first_unknown_line.setdefault(key, line)
        record, errors, warnings = normalize_record(
            row,
            source=source.location,
            line=line,
            source_index=source_index,
            require_teacher_scores=require_teacher_scores,
        )
        for error in errors:
            collector.add(error)
        if warnings:
            dropped_negatives += len(warnings)
            records_with_dropped.append(line)
        # Once the data is known to be bad, keeping records would only cost memory.
        if record is not None and not collector.has_errors:
            if source.name != source.location:
                record["source"] = source.name
                record["id"] = f"{source.name}:{line}"
            records.append(record)

    if unknown_fields and first_layout is not None:
        known = sorted(_KNOWN_FIELDS[first_layout[0]])
        listed = "; ".join(
            f"'{key}' ({count} record{'s' if count > 1 else ''}, first at line {first_unknown_line[key]})"
            f"{_field_hint(key, known)}"
            for key, count in unknown_fields.most_common()
        )
        logger.warning(
            "%s: ignored field(s) that the %s layout does not read: %s. Known fields: %s",
            source.location,
            first_layout[0],
            listed,
            ", ".join(known),
        )
    if num_rows == 0:
        what = "dataset has no rows" if source.path is None else "file is empty (no records)"
        collector.add(ValidationIssue(source.location, 0, None, what))
    if dropped_negatives:
        logger.warning(
            "%s: dropped %d negative(s) identical to a positive of the same record (%d records, first at line %d)",
            source.location,
            dropped_negatives,
            len(records_with_dropped),
            records_with_dropped[0],
        )


def _unknown_fields(row: Mapping[str, Any], layout: str) -> list[str]:
    known = _KNOWN_FIELDS[layout]
    quiet = _SILENTLY_IGNORED.get(layout, frozenset())
    unknown = []
    for key in row:
        key = str(key)
        if key in known or key in quiet:
            continue
        if layout == SENTENCE_TRANSFORMERS_FORMAT and key.startswith("negative_") and key[9:].isdigit():
            continue
        unknown.append(key)
    return unknown


def _field_hint(key: str, known: Sequence[str]) -> str:
    """`" (did you mean 'neg'?)"` for a misspelt field, or `""`."""
    alias = _FIELD_ALIASES.get(key.lower())
    if alias in known:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _ObjectWithDuplicates(dict):
    """A parsed JSON object in which a key occurred twice: keeps the last value, notes each duplicate."""

    duplicates: list[tuple[str, Any]]


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json` object hook that keeps the first value of each duplicated key in view, to report it."""
    obj: dict[str, Any] = {}
    duplicates: list[tuple[str, Any]] = []
    for key, value in pairs:
        if key in obj:
            duplicates.append((key, obj[key]))
        obj[key] = value
    if not duplicates:
        return obj
    marked = _ObjectWithDuplicates(obj)
    marked.duplicates = duplicates
    return marked


def _duplicate_keys(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """`(field path, first value)` of every key given twice anywhere inside a parsed record."""
    found: list[tuple[str, Any]] = []
    if isinstance(value, _ObjectWithDuplicates):
        found.extend((f"{path}.{key}" if path else key, first) for key, first in value.duplicates)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                found.extend(_duplicate_keys(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                found.extend(_duplicate_keys(item, f"{path}[{index}]"))
    return found


def _preview(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_data_file(path: Path) -> IO[bytes]:
    suffix = _data_suffix(path)
    opener = COMPRESSED_SUFFIXES.get(suffix[1]) if suffix is not None and suffix[1] else None
    return opener(path, "rb") if opener is not None else open(path, "rb")


# what a truncated or corrupt compressed file raises while it is read
_DECOMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)


def _iter_dataset(dataset: Any) -> Iterator[tuple[int, Any]]:
    yield from enumerate(dataset, start=1)


def _iter_file(path: Path, location: str) -> Iterator[tuple[int, Any]]:
    """Yield `(line, parsed object)` or `(line, ValidationIssue)` for each non-blank line of a data file.

    A file in another encoding than UTF-8 is one issue naming the encoding (a UTF-16/32 byte-order mark, or
    Latin-1 bytes) and how many lines it spoils; a file that is one JSON document spread over many lines (an
    array, an object wrapping the records, pretty-printed records) is one issue naming that format, not one
    "invalid JSON" per line.
    """
    try:
        # Opened outside the `with` so that a failure to open is told apart from errors while reading.
        handle = _open_data_file(path)
    except OSError as error:
        yield 0, ValidationIssue(location, 0, None, f"cannot be read: {error.strerror or error}")
        return
    line = 0
    with handle:
        try:
            wide = _wide_encoding(handle)
            if wide is not None:
                yield 1, ValidationIssue(
                    location, 1, "<encoding>", f"the file is {wide}, not UTF-8; save it as UTF-8 (e.g. iconv -f "
                    f"{wide.split()[0]} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})"
                )  # fmt: skip
                return
            suffix = _data_suffix(path)
            if suffix is not None and suffix[0] == ".json" and _starts_with_array(handle):
                yield from _iter_json_array(handle, location)
                return
            bad_lines: list[int] = []
            first_bad: tuple[bytes, UnicodeDecodeError] | None = None
            first_value = True
            # Binary lines, decoded one at a time, so a bad byte is reported on its own line and the rest of
            # the file is still checked; iterating the handle streams without loading the file.
            for line, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad_lines.append(line)
                    first_bad = first_bad or (raw, error)
                    continue
                if line == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                try:
                    value = json.loads(text, object_pairs_hook=_object_pairs)
                except json.JSONDecodeError as error:
                    if first_value and text.lstrip()[:1] in ("{", "[") and error.pos >= len(text.rstrip()):
                        # the first value does not end on its line: the file is one document, not JSON Lines
                        yield line, _whole_document_issue(path, location, line)
                        return
                    yield (
                        line,
                        ValidationIssue(
                            location, line, "<json>", f"invalid JSON: {error.msg} at column {error.colno}"
                        ),
                    )
                    first_value = False
                    continue
                if first_value and isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                    yield line, ValidationIssue(
                        location, line, "<format>", f"line {line} holds a JSON array of {len(value)} objects, not "
                        "one record; JSON Lines holds one record (object) per line: write one per line, or name "
                        "the file .json (a .json file may hold one array of records)"
                    )  # fmt: skip
                    return
                first_value = False
                yield line, value
            if first_bad is not None:
                raw, error = first_bad
                more = f"; {len(bad_lines)} lines are not UTF-8 (lines {bad_lines[0]}-{bad_lines[-1]})"
                yield bad_lines[0], ValidationIssue(
                    location, bad_lines[0], "<encoding>",
                    f"invalid UTF-8 at byte {error.start + 1} of the line ({error.reason}){_guess_encoding(raw, error)}"
                    f"{more if len(bad_lines) > 1 else ''}",
                )  # fmt: skip
        except _DECOMPRESSION_ERRORS as error:
            yield (
                line + 1,
                ValidationIssue(
                    location,
                    line + 1,
                    "<file>",
                    f"cannot be decompressed after line {line} ({type(error).__name__}: {error}); "
                    "the file is truncated or corrupt",
                ),
            )


# byte-order marks of the encodings that no UTF-8 reader can read line by line (longest first)
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian, with a byte-order mark)"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian, with a byte-order mark)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian, with a byte-order mark FF FE)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian, with a byte-order mark FE FF)"),
)


def _wide_encoding(handle: IO[bytes]) -> str | None:
    """The name of a UTF-16/UTF-32 encoding the file is in (byte-order mark, or NUL bytes between ASCII); rewinds."""
    head = handle.read(4096)
    handle.seek(0)
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 4 and head.count(0) >= len(head) // 3:
        return "UTF-16 (no byte-order mark: every other byte is 0)"
    return None


def _guess_encoding(raw: bytes, error: UnicodeDecodeError) -> str:
    """`"; the file looks Latin-1 ..."` when the bad bytes read as Latin-1 / Windows-1252 text, else `""`."""
    byte = raw[error.start]
    try:
        shown = raw[error.start : error.start + 1].decode("cp1252")
    except UnicodeDecodeError:
        return f" (byte 0x{byte:02X})"
    return (
        f" (byte 0x{byte:02X}, '{shown}' in Latin-1); the file looks Latin-1 (ISO-8859-1 / Windows-1252) encoded: "
        "save it as UTF-8 (e.g. iconv -f latin1 -t UTF-8)"
    )


def _whole_document_issue(path: Path, location: str, line: int) -> ValidationIssue:
    """The one issue of a file that holds a single JSON document spread over lines, naming what it holds."""
    with _open_data_file(path) as handle:
        data = handle.read()
    try:
        document = json.loads(data.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f"line {error.lineno}: {error.msg}" if isinstance(error, json.JSONDecodeError) else error.reason
        return ValidationIssue(
            location, line, "<format>", f"the JSON value that starts on line {line} spans several lines ({where}); "
            "JSON Lines holds one record per line, each on one line (is the file pretty-printed?)"
        )  # fmt: skip
    lines = data.count(b"\n") + 1
    if isinstance(document, list):
        what = f"one JSON array of {len(document)} elements over {lines} lines"
        fix = "name the file .json (a .json file may hold one array of records) or write one record per line"
        if path.suffix.lower() == ".json" or _data_suffix(path) == (".json", path.suffix.lower()):
            fix = "write one record per line"
    elif isinstance(document, dict) and {"queries", "corpus", "qrels"} <= set(document):
        what = "an evaluation set {queries, corpus, qrels}"
        fix = "pass it as eval_data, not as training data"
    elif isinstance(document, dict):
        lists = [(k, v) for k, v in document.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if lists:
            key, records = max(lists, key=lambda item: len(item[1]))
            what = f"one JSON object wrapping {len(records)} records under the key '{key}'"
            fix = f"write the records of '{key}' one per line (.jsonl) or as a JSON array (.json)"
        else:
            what = f"one JSON object over {lines} lines (keys {', '.join(repr(k) for k in list(document)[:5])})"
            fix = "write one record per line (.jsonl), or a JSON array of records (.json)"
    else:
        what, fix = f"one JSON {type(document).__name__}", "write one record per line"
    return ValidationIssue(location, 0, None, f"the file is {what}, not JSON Lines (one record per line); {fix}")


def _starts_with_array(handle: IO[bytes]) -> bool:
    """Whether the first non-blank character is `[` (a JSON array rather than JSON Lines); rewinds."""
    at_start = True
    while chunk := handle.read(1 << 16):
        if at_start:
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
            at_start = False
        chunk = chunk.lstrip()
        if chunk:
            handle.seek(0)
            return chunk.startswith(b"[")
    handle.seek(0)
    return False


def _iter_json_array(handle: IO[bytes], location: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array file, numbered from 1 (an array can't be parsed line by line: it is read whole)."""
    data = handle.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        yield line, ValidationIssue(location, line, "<encoding>", f"invalid UTF-8 ({error.reason})")
        return
    try:
        elements = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as error:
        yield (
            error.lineno,
            ValidationIssue(location, error.lineno, "<json>", f"invalid JSON: {error.msg} at column {error.colno}"),
        )
        return
    yield from enumerate(elements, start=1)
