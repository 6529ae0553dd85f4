"""Score a jsonl of questions and candidate chunks with ARK's triple alignment, and rebuild training data.

`score_file` reads the records `start <= index < end` (a shard), checks them all, checks that every
prompt fits the LM with its chunk truncated, and only then loads the LM and the base retriever. It scores
fixed blocks of `records_per_block` records (the block boundaries depend only on `start`, so a resumed run
batches exactly like an uninterrupted one and writes the same bytes) and appends each finished block to the
output in one `write` + `fsync`. On restart, the blocks already in the output are skipped; a block cut short
by a crash mid-write is dropped and scored again.

Each output line is the input record plus

    "alignment": {"index": i, "lm": ..., "retriever": ..., "backward_kind": "ark" | "upr",
                  "<field>": [{"forward": S_f, "backward": S_b, "parameter": S_v, "tokens": n, "score": S}, ...]}

with one entry per chunk of `<field>` (`pos`, `neg` or `candidates`): raw scores, the chunk's LM token count
and the combination S (`ark_hf.alignment.combine`). `forward` is `null` for records without an answer.
`rebuild_records` turns scored records into ark_hf training records with `pos_scores` / `neg_scores`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ark_hf.alignment.combine import combine_scores
from ark_hf.alignment.embedding import encode_dense
from ark_hf.alignment.lm_scorer import CausalLMScorer, ScoreRequest
from ark_hf.alignment.prompts import ARK_BACKWARD_PROMPT, ARK_FORWARD_PROMPT, UPR_PROMPT, AlignmentPrompts
from ark_hf.alignment.records import AlignmentRecord, iter_jsonl, read_alignment_records
from ark_hf.data.dataset import format_instruction
from ark_hf.data.schema import DataValidationError, ValidationIssue
from ark_hf.utils.cli import ConfigError, parse_config

logger = logging.get_logger(__name__)

__all__ = [
    "AlignmentScoringConfig",
    "ComputeAlignmentConfig",
    "compute_alignment",
    "main",
    "rebuild_file",
    "rebuild_records",
    "score_file",
    "score_records",
]


@dataclass
class AlignmentScoringConfig:
    """Options of `score_file`, `recipes/compute_alignment.py` and `ark-hf score`.

    Data: `input_file`, `output_file` (both required to score), the shard `start`/`end` (record indices, `end` exclusive).
    Models: `lm_name_or_path` (any causal LM; required unless `score_file` is given a loaded LM), `retriever_name_or_path` (the base retriever of S_v; none: no S_v).
    Prompts: ARK's by default. Combination: ARK's weights (1.0, 0.3, 1.0) and 10-token short-chunk penalty.
    Rebuild: with `rebuild_output`, training records are written from the scores once scoring is complete.
    """

    input_file: str | None = field(
        default=None,
        metadata={"help": "jsonl with `query`, optional `answers`, and `pos`/`neg` or `candidates` (required)."},
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Scored jsonl (appended to; an existing file is resumed) (required)."}
    )
    lm_name_or_path: str | None = field(
        default=None, metadata={"help": "Causal LM of the forward and backward scores (required)."}
    )
    retriever_name_or_path: str | None = field(
        default=None, metadata={"help": "Base retriever of the parameter score S_v (none: S_v is left out)."}
    )
    retriever_kind: str = field(
        default="auto", metadata={"help": "Retriever class.", "choices": ["auto", "bge_m3", "decoder"]}
    )
    query_instruction: str | None = field(default=None, metadata={"help": "Instruction for the retriever's queries."})
    query_instruction_format: str = field(default="{}{}", metadata={"help": "Format of instruction + query."})
    query_max_len: int = field(default=128, metadata={"help": "Retriever tokens per query."})
    passage_max_len: int = field(default=512, metadata={"help": "Retriever tokens per chunk."})
    start: int = field(default=0, metadata={"help": "First record index of the shard."})
    end: int | None = field(default=None, metadata={"help": "Record index after the shard's last (none: to the end)."})
    records_per_block: int = field(default=32, metadata={"help": "Records scored together and appended at once."})
    max_length: int | None = field(
        default=None, metadata={"help": "LM tokens per sequence (none: the LM's, max 4096)."}
    )
    token_budget: int = field(default=16384, metadata={"help": "LM tokens per forward pass (rows x padded length)."})
    device: str | None = field(default=None, metadata={"help": "Device (none: cuda when available)."})
    torch_dtype: str | None = field(
        default=None,
        metadata={"help": "LM dtype: float32, bfloat16, float16 (none: bfloat16 on GPU, float32 on CPU)."},
    )
    forward_prompt: str = field(
        default=ARK_FORWARD_PROMPT, metadata={"help": "Forward template ({chunk}, {question})."}
    )
    backward_prompt: str = field(
        default=ARK_BACKWARD_PROMPT, metadata={"help": "Backward template ({chunk}, {answer})."}
    )
    backward_no_answer_prompt: str = field(
        default=UPR_PROMPT, metadata={"help": "Backward template without an answer (UPR)."}
    )
    continuation_separator: str = field(default=" ", metadata={"help": "Text before each scored continuation."})
    forward_weight: float = field(default=1.0, metadata={"help": "w_f of S."})
    backward_weight: float = field(default=0.3, metadata={"help": "w_b of S."})
    parameter_weight: float = field(default=1.0, metadata={"help": "w_v of S."})
    min_chunk_tokens: int = field(
        default=10, metadata={"help": "Chunks shorter than this are scaled by tokens / this."}
    )
    rebuild_output: str | None = field(default=None, metadata={"help": "Write training records here after scoring."})
    num_positives: int = field(default=1, metadata={"help": "Rebuild: top candidates by S kept as positives."})
    num_negatives: int = field(default=7, metadata={"help": "Rebuild: hard negatives taken from the next ranks."})
    false_negative_ratio: float = field(
        default=0.95, metadata={"help": "Rebuild: drop negatives with S above this times the lowest positive's S."}
    )
    show_progress: bool = field(default=True, metadata={"help": "tqdm bar over records."})

    @property
    def prompts(self) -> AlignmentPrompts:
        return AlignmentPrompts(
            self.forward_prompt, self.backward_prompt, self.backward_no_answer_prompt, self.continuation_separator
        )

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.forward_weight, self.backward_weight, self.parameter_weight)


# ------------------------------------------------------------------------------------------------- checks
def _requests(record: AlignmentRecord, prompts: AlignmentPrompts) -> tuple[list[ScoreRequest], list[ScoreRequest]]:
    """Forward and backward requests of every chunk (no forward ones without an answer)."""
    forward, backward = [], []
    if record.answer is not None:
        before_f, after_f = prompts.split(prompts.forward, question=record.query)
        before_b, after_b = prompts.split(prompts.backward, answer=record.answer)
        forward = [ScoreRequest(before_f, c, after_f, record.answer) for c in record.chunks]
    else:
        before_b, after_b = prompts.split(prompts.backward_no_answer)
    backward = [ScoreRequest(before_b, c, after_b, record.query) for c in record.chunks]
    return forward, backward


def check_lengths(
    records: Sequence[AlignmentRecord], scorer: CausalLMScorer, prompts: AlignmentPrompts, source: str
) -> None:
    """Refuse (file:line:field) any record whose prompt without chunk plus continuation exceeds the LM's length."""
    issues = []
    for record in records:
        forward, backward = _requests(record, prompts)
        for kind, requests, field_name in (("forward", forward, "answers[0]"), ("backward", backward, "query")):
            if requests:
                r = requests[0]
                need = scorer.fixed_length(r.before, r.after, r.continuation)
                if need > scorer.max_length:
                    issues.append(
                        ValidationIssue(
                            source,
                            record.line,
                            field_name,
                            f"the {kind} prompt with this text takes {need} tokens before any chunk, more than "
                            f"max_length={scorer.max_length}",
                        )  # fmt: skip
                    )
    if issues:
        raise DataValidationError(issues)


# ------------------------------------------------------------------------------------------------ scoring
def score_records(
    records: Sequence[AlignmentRecord],
    lm: CausalLMScorer,
    retriever: Any | None,
    config: AlignmentScoringConfig,
) -> list[dict[str, Any]]:
    """Score a block of records; returns their output lines (input record + `alignment`) in input order."""
    prompts = config.prompts
    forward_requests, backward_requests, spans = [], [], []
    for record in records:
        forward, backward = _requests(record, prompts)
        spans.append((len(forward_requests), len(forward), len(backward_requests), len(backward)))
        forward_requests += forward
        backward_requests += backward
    # one LM pass over the whole block: length sorting packs chunks of different records together
    lm_scores = lm.mean_logprobs(forward_requests + backward_requests)
    forward_scores, backward_scores = lm_scores[: len(forward_requests)], lm_scores[len(forward_requests) :]
    parameter_scores: list[list[float | None]] = [[None] * len(r.chunks) for r in records]
    if retriever is not None:
        queries = [
            format_instruction(r.query, config.query_instruction, config.query_instruction_format) for r in records
        ]
        chunks = [c for r in records for c in r.chunks]
        with torch.no_grad():
            q = encode_dense(retriever, queries, max_length=config.query_max_len)
            d = encode_dense(retriever, chunks, max_length=config.passage_max_len)
        offset = 0
        for i, record in enumerate(records):
            n = len(record.chunks)
            parameter_scores[i] = [float(x) for x in (d[offset : offset + n] @ q[i]).double()]
            offset += n
    lm_name = getattr(lm.model.config, "_name_or_path", None) or type(lm.model).__name__
    retriever_name = None if retriever is None else getattr(retriever, "name_or_path", type(retriever).__name__)
    lines = []
    for record, (f0, nf, b0, nb), parameter in zip(records, spans, parameter_scores):
        forward = forward_scores[f0 : f0 + nf] if nf else [None] * len(record.chunks)
        backward = backward_scores[b0 : b0 + nb]
        tokens = [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in record.chunks]
        combined = combine_scores(
            forward, backward, parameter, tokens, weights=config.weights, min_tokens=config.min_chunk_tokens
        )
        alignment: dict[str, Any] = {
            "index": record.index,
            "lm": lm_name,
            "retriever": retriever_name,
            "backward_kind": "ark" if record.answer is not None else "upr",
        }
        for j, name in enumerate(record.fields):
            entry = {"forward": forward[j], "backward": backward[j], "parameter": parameter[j], "tokens": tokens[j]}
            entry["score"] = combined[j]
            alignment.setdefault(name, []).append(entry)
        lines.append({**record.raw, "alignment": alignment})
    return lines


def _append(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    """Append lines in one `write` and fsync: a crash leaves whole blocks plus at most one torn tail."""
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _finished_blocks(path: Path, start: int, block: int, expected: dict[int, int]) -> set[int]:
    """Blocks already complete in `path`; rewrites the file without a torn tail or partial blocks."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    lines = raw[:cut].decode("utf-8").splitlines()
    by_block: dict[int, list[tuple[int, str]]] = {}
    for number, text in enumerate(lines, start=1):
        try:
            index = json.loads(text)["alignment"]["index"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}:{number}: not a line of this scorer's output ({error}); move the file away"
            ) from error
        if index < start or (index - start) // block not in expected:
            raise ValueError(
                f"{path}:{number}: record index {index} is outside this shard; was it made with other start/end?"
            )
        by_block.setdefault((index - start) // block, []).append((index, text))
    done = {b for b, entries in by_block.items() if len({i for i, _ in entries}) == expected[b]}
    if cut != len(raw) or len(done) != len(by_block):
        kept = [text for b in sorted(done) for _, text in sorted(by_block[b])]
        logger.warning("%s: dropping an incomplete block left by an interrupted run; it is scored again", path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
        os.replace(tmp, path)
    return done


def score_file(
    config: AlignmentScoringConfig,
    *,
    lm: CausalLMScorer | None = None,
    retriever: Any | None = None,
    load_lm: Callable[[], CausalLMScorer] | None = None,
) -> Path:
    """Score the shard `config.start:config.end` of `config.input_file` into `config.output_file` (resumable).

    `lm` / `retriever` may be given already loaded; otherwise they are loaded from the config after every
    record has been checked. Returns the output path.
    """
    required = ["input_file", "output_file"] + (["lm_name_or_path"] if lm is None and load_lm is None else [])
    missing = [f"`{name}`" for name in required if not getattr(config, name)]
    if missing:
        raise ConfigError(f"scoring needs {', '.join(missing)}")
    records = read_alignment_records(config.input_file, config.start, config.end)
    if not records:
        raise DataValidationError(
            [ValidationIssue(config.input_file, 0, None, f"no record in [{config.start}, {config.end})")]
        )
    block = config.records_per_block
    groups: dict[int, list[AlignmentRecord]] = {}
    for record in records:
        groups.setdefault((record.index - config.start) // block, []).append(record)
    output = Path(config.output_file)
    done = _finished_blocks(output, config.start, block, {b: len(g) for b, g in groups.items()})
    todo = [b for b in sorted(groups) if b not in done]
    if lm is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.lm_name_or_path)
        length_only = _TokenizerOnly(tokenizer, config)
        check_lengths(records, length_only, config.prompts, config.input_file)  # before the LM's weights load
        if todo:
            lm = load_lm() if load_lm is not None else _load_lm(config)
    else:
        check_lengths(records, lm, config.prompts, config.input_file)
    if todo and retriever is None and config.retriever_name_or_path:
        from ark_hf.alignment.embedding import load_retriever

        retriever = load_retriever(config.retriever_name_or_path, config.retriever_kind, config.device)
    output.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    finished = sum(len(groups[b]) for b in done)
    with tqdm(
        total=len(records), initial=finished, unit="record", desc="Alignment", disable=not config.show_progress
    ) as bar:
        for b in todo:
            _append(output, score_records(groups[b], lm, retriever, config))
            bar.update(len(groups[b]))
    if config.rebuild_output:
        rebuild_file(output, config.rebuild_output, config)
    return output


class _TokenizerOnly(CausalLMScorer):
    """The length checks of `CausalLMScorer` with a tokenizer alone (the LM is not loaded yet)."""

    def __init__(self, tokenizer: Any, config: AlignmentScoringConfig) -> None:
        from transformers import AutoConfig

        self.tokenizer = tokenizer
        self.continuation_separator = config.continuation_separator
        limit = getattr(AutoConfig.from_pretrained(config.lm_name_or_path), "max_position_embeddings", None) or 4096
        self.max_length = config.max_length if config.max_length is not None else min(limit, 4096)
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.prefix_ids = [bos] if bos is not None and probe and probe[0] == bos else []


def _load_lm(config: AlignmentScoringConfig) -> CausalLMScorer:
    dtype = getattr(torch, config.torch_dtype) if config.torch_dtype else None
    return CausalLMScorer.from_pretrained(
        config.lm_name_or_path,
        device=config.device,
        torch_dtype=dtype,
        max_length=config.max_length,
        token_budget=config.token_budget,
        continuation_separator=config.continuation_separator,
    )


# ------------------------------------------------------------------------------------------------ rebuild
def rebuild_records(
    scored: Sequence[dict[str, Any]],
    *,
    num_positives: int = 1,
    num_negatives: int = 7,
    false_negative_ratio: float = 0.95,
) -> list[dict[str, Any]]:
    """ark_hf training records from scored records.

    Per question the candidates are ranked by S; the first `num_positives` become `pos`; the next
    candidates become `neg` (at most `num_negatives`), except those whose S exceeds `false_negative_ratio`
    times the lowest positive's S (likely unlabelled positives, NV-Retriever's positive-aware filter,
    arXiv 2407.15831). `pos_scores` / `neg_scores` carry S, for the distillation losses. `prompt` and
    `type` are kept.
    """
    out = []
    for record in scored:
        alignment = record["alignment"]
        ranked = sorted(
            ((entry["score"], chunk) for name in ("pos", "neg", "candidates") if name in alignment
             for entry, chunk in zip(alignment[name], record[name])),
            key=lambda pair: -pair[0],
        )  # fmt: skip
        positives = ranked[:num_positives]
        floor = false_negative_ratio * positives[-1][0]
        negatives = [pair for pair in ranked[num_positives:] if pair[0] <= floor][:num_negatives]
        training = {
            "query": record["query"],
            "pos": [c for _, c in positives],
            "neg": [c for _, c in negatives],
            "pos_scores": [s for s, _ in positives],
            "neg_scores": [s for s, _ in negatives],
        }
        for key in ("prompt", "type"):
            if key in record:
                training[key] = record[key]
        out.append(training)
    return out


def rebuild_file(scored_path: str | Path, output_path: str | Path, config: AlignmentScoringConfig) -> Path:
    """`rebuild_records` over a scored jsonl (in record order), written to `output_path` through a rename.

    A missing file, or a line that is not this scorer's output, is refused (file:line) before anything is written.
    """
    if not Path(scored_path).is_file():
        raise DataValidationError([ValidationIssue(str(scored_path), 0, None, "file not found")])
    scored, issues = [], []
    for _, number, text in iter_jsonl(scored_path):
        try:
            record = json.loads(text)
            int(record["alignment"]["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            message = f"not a line of the scorer's output ({type(error).__name__}: {error}); score the file first"
            issues.append(ValidationIssue(str(scored_path), number, "alignment", message))
            continue
        scored.append(record)
    if issues:
        raise DataValidationError(issues)
    scored.sort(key=lambda r: r["alignment"]["index"])
    rebuilt = rebuild_records(
        scored,
        num_positives=config.num_positives,
        num_negatives=config.num_negatives,
        false_negative_ratio=config.false_negative_ratio,
    )
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rebuilt), encoding="utf-8")
    os.replace(tmp, output_path)
    return output_path


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class ComputeAlignmentConfig(AlignmentScoringConfig):
    """`AlignmentScoringConfig` plus `rebuild_only`: the options of `recipes/compute_alignment.py` / `ark-hf score`."""

    rebuild_only: str | None = field(
        default=None,
        metadata={"help": "Skip scoring: rebuild training records from this scored jsonl into --rebuild_output."},
    )

    def __post_init__(self) -> None:
        if self.rebuild_only:
            if not self.rebuild_output:
                raise ConfigError("--rebuild_only needs --rebuild_output (the training records' file)")
            return
        missing = [f"--{name}" for name in ("input_file", "output_file", "lm_name_or_path") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"scoring needs {', '.join(missing)} (or --rebuild_only SCORED.jsonl to rebuild only)")


def compute_alignment(config: ComputeAlignmentConfig) -> Path:
    """Score `input_file` (resumable, one shard) and rebuild training records if asked; or only rebuild.

    Returns the last file written: `rebuild_output` when given, else `output_file`.
    """
    if config.rebuild_only:
        return rebuild_file(config.rebuild_only, config.rebuild_output, config)
    output = score_file(config)
    return Path(config.rebuild_output) if config.rebuild_output else output


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> str:
    """Parse `--config file.yaml` and flags into a `ComputeAlignmentConfig` and run `compute_alignment`."""
    config = parse_config(ComputeAlignmentConfig, None if argv is None else list(argv), prog=prog)
    return str(compute_alignment(config))
