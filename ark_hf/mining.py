"""Hard-negative mining with the model being trained (dense, or BGE-M3's dense+sparse hybrid).

```python
from ark_hf.mining import mine_hard_negatives

result = mine_hard_negatives("data/train.jsonl", "out/m3", output_path="data/train_mined.jsonl",
                             num_negatives=7, relative_margin=0.05)
print(result.stats)
```

or `ark-hf mine --data data/train.jsonl --model out/m3 --output data/train_mined.jsonl --relative_margin 0.05`.

What it does, per distinct query (records with the same query text and instruction are one query whose positives
are the union of theirs, as sentence-transformers' `mine_hard_negatives` treats duplicate anchors):

1. Embed the corpus (every positive of the data, plus an optional corpus file) and the queries with the model;
   the corpus embeddings are cached on disk, keyed by a fingerprint of the model weights, the encoding settings
   and the corpus texts.
2. Score every corpus text: `s = <q, p>` (dense), or `s = (w_d <q, p> + w_s lex(q, p)) / (w_d + w_s)` (hybrid,
   FlagEmbedding's `sparse+dense` score), and rank the candidates by `s`, leaving out the query's own positives
   and the query text itself. Identity is the content hash (`ark_hf.data.hashing.text_hash`) of the stripped
   text, the same test the data loader uses to drop a negative identical to a positive, so a mined negative is
   never dropped at load time.
3. Keep the rank window `[range_min, range_max)` of that ranking (rank 0 is the most similar non-positive).
4. Drop the candidates too close to the positive, with `p` the query's *lowest* positive score (the safe choice
   with several positives): absolute margin `s > p - absolute_margin`; relative margin
   `s > p - |p| * relative_margin` (which is `s > p (1 - relative_margin)` for the usual `p > 0`, and keeps its
   meaning when `p < 0`; `relative_margin=0.05` is NV-Retriever's TopK-PercPos at 95%, arXiv 2407.15831);
   and `s > max_score`.
5. Take `num_negatives` of the survivors: the highest-scoring (`top`) or a seeded random sample (`random`, written
   in score order).
6. Optionally score the record's positives and mined negatives with a teacher (a cross-encoder, or a bi-encoder)
   and write them as `pos_scores` / `neg_scores` (for `knowledge_distillation`).

The output is ark_hf jsonl (`query`, `pos`, `neg`, optional `pos_scores`/`neg_scores`, `prompt`, `type`), one
record per input record in input order, and trains as it is. The record's old negatives are replaced.

How it relates to sentence-transformers' `mine_hard_negatives` (same model and settings): without score filters
the negatives are the same. With filters, sentence-transformers first filters the `range_max + max_positives`
retrieved candidates and then windows the survivors, while here the window is taken on the ranking first (a
candidate's rank does not depend on which other candidates a filter removed). With `range_min=0` the two agree
except for a query whose top survivors lie beyond rank `range_max` (sentence-transformers may still reach them
because it retrieves `max_positives` extra candidates per query). `tests/test_mining.py` checks both statements.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ark_hf.data.dataset import format_instruction
from ark_hf.data.hashing import text_hash

logger = logging.get_logger(__name__)

__all__ = ["MiningArguments", "MiningResult", "load_corpus_file", "load_mining_model", "mine_hard_negatives"]

MODES = ("dense", "dense+sparse")
SAMPLING = ("top", "random")
CACHE_VERSION = 1


@dataclass
class MiningArguments:
    """Options of `ark-hf mine` (each one a keyword of `mine_hard_negatives`)."""

    data: list[str] = field(
        metadata={"help": "Training data to mine for (ark_hf jsonl/json files or folders; validated).", "nargs": "+"}
    )
    model: str = field(metadata={"help": "The model to mine with: a saved ark_hf folder or a Hub name."})
    output: str = field(metadata={"help": "Where to write the mined ark_hf jsonl."})
    corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra candidate passages: .txt (one a line) or .jsonl (a string or {'text': ...} a line).",
            "nargs": "+",
        },
    )
    model_type: str = field(
        default="auto",
        metadata={
            "help": "How to load the model: bge-m3, qwen3 (decoder, last-token) or auto (decoder configs -> qwen3).",
            "choices": ["auto", "bge-m3", "qwen3"],
        },
    )
    mode: str = field(
        default="dense",
        metadata={"help": "Retrieval scores: dense, or dense+sparse (BGE-M3 hybrid).", "choices": list(MODES)},
    )
    sparse_weight: float = field(default=0.3, metadata={"help": "Weight of the sparse score in dense+sparse mode."})
    num_negatives: int = field(default=7, metadata={"help": "Negatives written per record."})
    range_min: int = field(default=0, metadata={"help": "Skip the first range_min non-positive candidates."})
    range_max: int | None = field(
        default=None,
        metadata={
            "help": "Candidates come from ranks [range_min, range_max). Default: range_min + num_negatives, "
            "or range_min + 10 * num_negatives when a score filter is set."
        },
    )
    absolute_margin: float | None = field(
        default=None, metadata={"help": "Drop candidates scoring above (lowest positive score - margin)."}
    )
    relative_margin: float | None = field(
        default=None,
        metadata={"help": "Drop candidates above p - |p| * margin (p: lowest positive score). 0.05: NV-Retriever."},
    )
    max_score: float | None = field(default=None, metadata={"help": "Drop candidates scoring above this value."})
    sampling_strategy: str = field(
        default="top",
        metadata={"help": "Take the top survivors or a seeded random sample of them.", "choices": list(SAMPLING)},
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "Cross-encoder (or bi-encoder) whose scores are written as pos_scores/neg_scores."},
    )
    teacher_max_len: int = field(default=512, metadata={"help": "Maximum tokens per teacher pair."})
    query_instruction: str | None = field(
        default=None, metadata={"help": "Instruction for queries (a record's `prompt` wins)."}
    )
    query_instruction_format: str = field(
        default="{}{}", metadata={"help": "How instruction and query are joined (Qwen3: 'Instruct: {}\\nQuery:{}')."}
    )
    query_max_len: int = field(default=64, metadata={"help": "Maximum query length in tokens."})
    passage_max_len: int = field(default=512, metadata={"help": "Maximum passage length in tokens."})
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Folder for cached corpus embeddings (keyed by model weights and corpus)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the random sampling strategy."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})
    device: str | None = field(default=None, metadata={"help": "Device to encode on (default: cuda if available)."})


@dataclass
class MiningResult:
    """What `mine_hard_negatives` produced.

    Attributes:
        records: the mined records (ark_hf layout), one per input record.
        stats: counts: queries, corpus size, candidates dropped by each filter, records with fewer negatives than
            asked for, whether the corpus embeddings came from the cache.
        output_path: the file written, if any.
    """

    records: list[dict[str, Any]]
    stats: dict[str, Any]
    output_path: str | None = None


def _content_key(text: str) -> int:
    """A passage's identity in mining: `text_hash` of the text without surrounding whitespace (the loader's rule)."""
    return text_hash(text.strip())


def load_corpus_file(path: str | os.PathLike) -> list[str]:
    """Passages of a corpus file: `.txt` (one per non-blank line) or `.jsonl` (a JSON string or `{"text": ...}`).

    Raises:
        ValueError: naming the file, the line and the field of the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: corpus file not found")
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix.lower() == ".txt":
                texts.append(line.rstrip("\n"))
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {error.msg} at column {error.colno}") from None
            if isinstance(value, Mapping):
                value = value.get("text")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path}:{line_no}: field 'text': expected a non-empty string")
            texts.append(value)
    if not texts:
        raise ValueError(f"{path}: corpus file is empty")
    return texts


def load_mining_model(name_or_path: str, model_type: str = "auto", device: str | None = None) -> torch.nn.Module:
    """A `BGEM3Model` or `DecoderEmbedder` for mining, in eval mode on `device`: `ark_hf.models.loading.load_embedder`
    (`model_type`: auto, bge-m3 or qwen3; LoRA adapter folders load on their base model)."""
    from ark_hf.models.loading import load_embedder

    return load_embedder(name_or_path, model_type, device)


def _model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the weights and the settings that change embeddings (the model being trained changes every step)."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for attribute in ("pooling", "normalize", "eos_token_id"):
        digest.update(f"{attribute}={getattr(model, attribute, None)}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _encode(
    model: torch.nn.Module, texts: list[str], max_length: int, batch_size: int, sparse: bool, desc: str, progress: bool
) -> tuple[torch.Tensor, Any]:
    """Dense vectors `[N, d]` (float32, CPU) and, with `sparse`, a CSR matrix of max lexical weight per token id."""
    from scipy import sparse as sp
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
    dense = torch.empty(0)
    rows, cols, vals = [], [], []
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            features = model.tokenize([texts[i] for i in batch], max_length)
            out = model.encode_features({k: v.to(device) for k, v in features.items()})
            chunks.append(out.dense.float().cpu())
            if sparse:
                for row, ids, weights in zip(batch, out.input_ids.cpu().tolist(), out.sparse_weights.float().cpu()):
                    entry: dict[int, float] = {}
                    for token_id, weight in zip(ids, weights.tolist()):
                        if weight > entry.get(token_id, 0.0):
                            entry[token_id] = weight
                    rows.extend([row] * len(entry))
                    cols.extend(entry)
                    vals.extend(entry.values())
        dense = torch.cat(chunks)[torch.as_tensor(np.argsort(order))]
    finally:
        model.train(was_training)
    lexical = None
    if sparse:
        width = len(model.tokenizer)
        lexical = sp.csr_matrix((vals, (rows, cols)), shape=(len(texts), width), dtype=np.float32)
    return dense, lexical


def _cached_corpus_embeddings(
    model: torch.nn.Module,
    corpus: list[str],
    *,
    max_length: int,
    batch_size: int,
    sparse: bool,
    cache_dir: str | None,
    progress: bool,
) -> tuple[torch.Tensor, Any, bool]:
    """Corpus embeddings, from `cache_dir` when the same model, settings and corpus were encoded before."""
    from scipy import sparse as sp

    path = None
    if cache_dir:
        key = hashlib.sha256()
        key.update(f"v{CACHE_VERSION}:{_model_fingerprint(model)}:{max_length}:{sparse}".encode())
        for text in corpus:
            key.update(text_hash(text).to_bytes(8, "little"))
        path = Path(cache_dir) / f"corpus-{key.hexdigest()[:32]}.npz"
        if path.is_file():
            with np.load(path) as saved:
                dense = torch.from_numpy(saved["dense"])
                lexical = None
                if sparse:
                    lexical = sp.csr_matrix(
                        (saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"])
                    )
            logger.info("corpus embeddings loaded from the cache %s", path)
            return dense, lexical, True
    dense, lexical = _encode(model, corpus, max_length, batch_size, sparse, "Encoding corpus", progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"dense": dense.numpy()}
        if lexical is not None:
            arrays.update(data=lexical.data, indices=lexical.indices, indptr=lexical.indptr, shape=lexical.shape)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        _replace_as_new_file(tmp, path)  # a reader never sees a half-written cache file
        logger.info("corpus embeddings cached in %s", path)
    return dense, lexical, False


def _resolve_range_max(range_min: int, range_max: int | None, num_negatives: int, filtered: bool) -> int:
    if range_max is None:
        # sentence-transformers' default: room for filtered candidates when a filter is set
        range_max = range_min + num_negatives * (10 if filtered else 1)
    return range_max


def _check_options(
    num_negatives: int,
    range_min: int,
    range_max: int,
    absolute_margin: float | None,
    relative_margin: float | None,
    mode: str,
    sampling_strategy: str,
    sparse_weight: float,
) -> None:
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if range_min < 0:
        raise ValueError(f"range_min must be >= 0, got {range_min}")
    if range_max - range_min < num_negatives:
        raise ValueError(
            f"the rank window [range_min={range_min}, range_max={range_max}) holds {range_max - range_min} "
            f"candidates, fewer than num_negatives={num_negatives}"
        )
    for name, value in (("absolute_margin", absolute_margin), ("relative_margin", relative_margin)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sampling_strategy not in SAMPLING:
        raise ValueError(f"sampling_strategy must be one of {SAMPLING}, got {sampling_strategy!r}")
    if mode == "dense+sparse" and sparse_weight <= 0:
        raise ValueError(f"sparse_weight must be > 0 in dense+sparse mode, got {sparse_weight}")


def _check_output(output_path: str | os.PathLike | None, overwrite: bool) -> None:
    if output_path is None:
        return
    path = Path(output_path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file path such as {path / 'mined.jsonl'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; pass overwrite=True (--overwrite) to replace it")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output {path}: {parent} is not writable")


def _replace_as_new_file(tmp: str, path: Path) -> None:
    """Rename a `mkstemp` file onto `path` with the mode of any new file (0666 less the umask, e.g. 0644):
    `mkstemp` creates it 0600, readable by its owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_records(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write ark_hf jsonl atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        _replace_as_new_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mine_hard_negatives(
    data: Any,
    model: torch.nn.Module | str,
    *,
    output_path: str | os.PathLike | None = None,
    corpus: Sequence[str] | None = None,
    corpus_files: Sequence[str | os.PathLike] | None = None,
    mode: str = "dense",
    sparse_weight: float = 0.3,
    num_negatives: int = 7,
    range_min: int = 0,
    range_max: int | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    sampling_strategy: str = "top",
    teacher: Any = None,
    teacher_max_len: int = 512,
    query_instruction: str | None = None,
    query_instruction_format: str = "{}{}",
    query_max_len: int = 64,
    passage_max_len: int = 512,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 42,
    overwrite: bool = False,
    show_progress_bar: bool = True,
    model_type: str = "auto",
    device: str | None = None,
    distribute: Callable[[list[str], Callable[[list[str]], tuple[torch.Tensor, Any]]], tuple[torch.Tensor, Any]]
    | None = None,
) -> MiningResult:
    """Mine hard negatives for training records with an ark_hf model (see the module docstring for the math).

    Everything that can be checked (options, data, corpus file, output path) is checked before the model loads.

    Args:
        data: training records: paths/folders/datasets (validated with `load_training_records`), or records already
            in the internal form.
        model: a `BGEM3Model` / `DecoderEmbedder` (e.g. the one being trained), or a folder / Hub name to load.
        output_path: write the mined records there as jsonl (atomically); `None` only returns them.
        corpus: extra candidate passages (texts).
        corpus_files: files of extra candidate passages (see `load_corpus_file`).
        mode: `dense`, or `dense+sparse` (BGE-M3 models with a sparse head).
        sparse_weight: `w_s` of the hybrid score (`w_d` = 1).
        num_negatives: negatives per record.
        range_min, range_max: the rank window of non-positive candidates.
        absolute_margin, relative_margin, max_score: drop candidates too close to the positive / too high.
        sampling_strategy: `top` or `random` (seeded by `seed`).
        teacher: a `TeacherScorer`, or a model name/folder loaded as one (cross-encoder or bi-encoder, detected),
            whose scores become `pos_scores` / `neg_scores`.
        teacher_max_len: maximum tokens per teacher pair when `teacher` is a name.
        query_instruction, query_instruction_format: query instruction (a record's `prompt` wins), as in training.
        query_max_len, passage_max_len, batch_size: encoding settings (use the training lengths).
        cache_dir: cache for the corpus embeddings.
        overwrite: replace an existing `output_path`.
        show_progress_bar: tqdm bars for encoding, retrieval and teacher scoring.
        model_type, device: how to load `model` when it is a name (see `load_mining_model`).
        distribute: how a list of texts gets embedded: `distribute(texts, encode)` must return what
            `encode(texts)` returns (dense vectors, lexical weights). A training run passes one that encodes a
            shard per process and gathers the shards (`ark_hf.callbacks.hard_negatives`); `None` encodes every
            text here. The corpus cache is not used with it (the model being trained changes every step).

    Returns:
        A `MiningResult` with the records and the counts.

    Example:
        >>> result = mine_hard_negatives(records, trainer.model, num_negatives=3, relative_margin=0.05)  # doctest: +SKIP
        >>> result.records[0]["neg"]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    filtered = absolute_margin is not None or relative_margin is not None or max_score is not None
    range_max = _resolve_range_max(range_min, range_max, num_negatives, filtered)
    _check_options(
        num_negatives, range_min, range_max, absolute_margin, relative_margin, mode, sampling_strategy, sparse_weight
    )
    _check_output(output_path, overwrite)
    records = _load_records(data)
    extra_corpus = [text for text in corpus or [] if text.strip()]
    for path in corpus_files or []:
        extra_corpus.extend(load_corpus_file(path))

    # distinct queries (text as encoded) and their positives' hashes
    query_keys: dict[str, int] = {}
    record_query: list[int] = []
    query_positive_hashes: list[set[int]] = []
    query_text_hashes: list[int] = []
    for record in records:
        text = format_instruction(record["query"], record.get("prompt") or query_instruction, query_instruction_format)
        index = query_keys.setdefault(text, len(query_keys))
        if index == len(query_positive_hashes):
            query_positive_hashes.append(set())
            query_text_hashes.append(_content_key(record["query"]))
        query_positive_hashes[index].update(_content_key(p) for p in record["pos"])
        record_query.append(index)
    queries = list(query_keys)

    # corpus: distinct texts (by content hash), positives first
    corpus_texts: list[str] = []
    corpus_index: dict[int, int] = {}
    for text in [p for record in records for p in record["pos"]] + extra_corpus:
        digest = _content_key(text)
        if digest not in corpus_index:
            corpus_index[digest] = len(corpus_texts)
            corpus_texts.append(text)

    if isinstance(model, (str, os.PathLike)):
        model = load_mining_model(str(model), model_type, device)
    sparse = mode == "dense+sparse"
    if sparse and not getattr(model, "has_heads", False):
        raise ValueError("mode 'dense+sparse' needs a BGE-M3 model with a sparse head; this model has none")
    if isinstance(teacher, (str, os.PathLike)):
        from ark_hf.models.teacher import TeacherScorer

        teacher = TeacherScorer(
            str(teacher), max_length=teacher_max_len, batch_size=batch_size, device=next(model.parameters()).device
        )

    if distribute is None:
        doc_dense, doc_lex, cached = _cached_corpus_embeddings(
            model,
            corpus_texts,
            max_length=passage_max_len,
            batch_size=batch_size,
            sparse=sparse,
            cache_dir=None if cache_dir is None else str(cache_dir),
            progress=show_progress_bar,
        )
        q_dense, q_lex = _encode(
            model, queries, query_max_len, batch_size, sparse, "Encoding queries", show_progress_bar
        )
    else:
        cached = False
        doc_dense, doc_lex = distribute(
            corpus_texts,
            lambda texts: _encode(
                model, texts, passage_max_len, batch_size, sparse, "Encoding corpus", show_progress_bar
            ),
        )
        q_dense, q_lex = distribute(
            queries,
            lambda texts: _encode(
                model, texts, query_max_len, batch_size, sparse, "Encoding queries", show_progress_bar
            ),
        )
    if sparse:
        width = max(q_lex.shape[1], doc_lex.shape[1])
        q_lex.resize((q_lex.shape[0], width))
        doc_lex.resize((doc_lex.shape[0], width))

    stats: dict[str, Any] = {
        "records": len(records),
        "queries": len(queries),
        "corpus": len(corpus_texts),
        "corpus_from_cache": cached,
        "range_min": range_min,
        "range_max": range_max,
        "dropped_absolute_margin": 0,
        "dropped_relative_margin": 0,
        "dropped_max_score": 0,
        "records_with_fewer_negatives": 0,
        "negatives_written": 0,
    }
    rng = random.Random(seed)
    positive_rows = [[corpus_index[h] for h in hashes] for hashes in query_positive_hashes]
    # never a positive of the query, nor the query text itself (a corpus may hold it)
    excluded_rows = [
        rows + ([corpus_index[h]] if (h := query_text_hashes[q]) in corpus_index else [])
        for q, rows in enumerate(positive_rows)
    ]
    depth = min(len(corpus_texts), range_max + max(len(rows) for rows in excluded_rows))
    chunk = max(1, (1 << 24) // max(1, len(corpus_texts)))  # at most ~16M scores in memory at once
    mined: list[list[tuple[int, float]]] = []
    w_dense, w_sparse = 1.0, sparse_weight
    for start in tqdm(range(0, len(queries), chunk), desc="Retrieving", unit="chunk", disable=not show_progress_bar):
        stop = min(start + chunk, len(queries))
        scores = q_dense[start:stop] @ doc_dense.T
        if sparse:
            lexical = torch.from_numpy((q_lex[start:stop] @ doc_lex.T).toarray().astype(np.float32))
            scores = (w_dense * scores + w_sparse * lexical) / (w_dense + w_sparse)
        positive_scores = [float(scores[q - start, positive_rows[q]].min()) for q in range(start, stop)]
        for q in range(start, stop):
            scores[q - start, excluded_rows[q]] = float("-inf")
        top_values, top_indices = scores.topk(depth, dim=1)
        for offset in range(stop - start):
            q = start + offset
            positive_score = positive_scores[offset]
            ranked = [
                (int(i), float(v))
                for v, i in zip(top_values[offset].tolist(), top_indices[offset].tolist())
                if v != float("-inf")
            ]
            window = ranked[range_min:range_max]
            survivors = []
            for index, score in window:
                if absolute_margin is not None and score > positive_score - absolute_margin:
                    stats["dropped_absolute_margin"] += 1
                elif relative_margin is not None and score > positive_score - abs(positive_score) * relative_margin:
                    stats["dropped_relative_margin"] += 1
                elif max_score is not None and score > max_score:
                    stats["dropped_max_score"] += 1
                else:
                    survivors.append((index, score))
            if sampling_strategy == "random" and len(survivors) > num_negatives:
                survivors = sorted(rng.sample(survivors, num_negatives), key=lambda item: -item[1])
            mined.append(survivors[:num_negatives])

    out_records: list[dict[str, Any]] = []
    for record, q in zip(records, record_query):
        negatives = [corpus_texts[i] for i, _ in mined[q]]
        if len(negatives) < num_negatives:
            stats["records_with_fewer_negatives"] += 1
        stats["negatives_written"] += len(negatives)
        out: dict[str, Any] = {"query": record["query"], "pos": list(record["pos"]), "neg": negatives}
        for key in ("prompt", "type"):
            if record.get(key) is not None:
                out[key] = record[key]
        out_records.append(out)
    had_scores = sum(1 for record in records if record.get("pos_scores") is not None)
    if had_scores and teacher is None:
        logger.warning(
            "%d input records carried teacher scores; they are not written (the negatives are new)", had_scores
        )

    if teacher is not None:
        for record, out in tqdm(
            list(zip(records, out_records)), desc="Teacher scores", unit="record", disable=not show_progress_bar
        ):
            query = format_instruction(
                record["query"], record.get("prompt") or query_instruction, query_instruction_format
            )
            texts = out["pos"] + out["neg"]
            scores = teacher.score([query], texts)[0].tolist()
            out["pos_scores"] = [float(s) for s in scores[: len(out["pos"])]]
            out["neg_scores"] = [float(s) for s in scores[len(out["pos"]) :]]

    if stats["records_with_fewer_negatives"]:
        logger.warning(
            "%d of %d records got fewer than %d negatives (widen range_max or loosen the margins)",
            stats["records_with_fewer_negatives"],
            len(records),
            num_negatives,
        )
    logger.info("mined %d negatives for %d records: %s", stats["negatives_written"], len(records), stats)
    if output_path is not None:
        write_records(out_records, output_path)
        logger.info("mined records written to %s", output_path)
    return MiningResult(
        records=out_records, stats=stats, output_path=None if output_path is None else str(output_path)
    )


def _load_records(data: Any) -> list[dict[str, Any]]:
    from ark_hf.data.loading import load_training_records

    if isinstance(data, list) and data and isinstance(data[0], Mapping) and "source_index" in data[0]:
        return [dict(record) for record in data]  # already validated records
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        import datasets

        data = datasets.Dataset.from_list([dict(record) for record in data])
    return load_training_records(data)
