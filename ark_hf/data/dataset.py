"""Training groups: one query, one sampled positive and `train_group_size - 1` negatives.

Sampling is a pure function of `(seed, epoch, index)`, so any worker, any process and a resumed run draw
the same group for the same record in the same epoch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["TrainGroupDataset", "format_instruction", "instruction_keys", "unmatched_instruction_keys"]


def format_instruction(text: str, instruction: str | None, template: str) -> str:
    """`template.format(instruction, text)`, or `text` unchanged when there is no instruction.

    A missing instruction never turns into the literal string 'None' (a known pitfall of `"{}{}".format`).
    """
    if not instruction:
        return text
    return template.format(instruction, text)


def instruction_keys(source: str) -> tuple[str, str, str]:
    """The `dataset_instructions` keys that name a record's source: the path as given, the file name, the stem."""
    name = os.path.basename(source)
    return source, name, os.path.splitext(name)[0]


def unmatched_instruction_keys(
    records: Sequence[Mapping[str, Any]], instructions: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """`(keys of instructions that match no record's source, the distinct sources)`, for error messages."""
    sources = sorted({str(r.get("source", "")) for r in records})
    known = {key for source in sources for key in instruction_keys(source)}
    return [key for key in instructions if key not in known], sources


class TrainGroupDataset(Dataset):
    """Map-style dataset of training groups over validated records (see `ark_hf.data.loading`).

    Args:
        records: records in the internal form (`query`, `pos`, `neg`, optional `pos_scores`/`neg_scores`,
            `prompt`, `type`, `source_index`, `id`).
        train_group_size: passages per query: 1 positive + `train_group_size - 1` negatives.
        seed: base seed; the group of record `i` in epoch `e` depends only on `(seed, e, i)`.
        query_instruction: instruction for queries: one string, or a mapping from source index to string.
            A record's own `prompt` field takes precedence.
        dataset_instructions: per-dataset query instructions, keyed by a record's `source` (the path as given,
            its file name, or its file name without extension); a source without a key uses `query_instruction`.
        query_instruction_format: how instruction and query are joined (`"{}{}"` for BGE,
            `"Instruct: {}\\nQuery:{}"` for Qwen3-Embedding).
        passage_instruction, passage_instruction_format: the same for passages (symmetric tasks).
        use_teacher_scores: return the teacher scores aligned with the sampled passages.

    Items: `query`, `passages` (the sampled positive first, then the negatives), `positives` (every positive of the
    record, formatted as the passages are: the losses keep them out of the query's negatives), `id`,
    `source_index`, and `teacher_scores` with `use_teacher_scores`.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        train_group_size: int = 8,
        seed: int = 42,
        query_instruction: str | Mapping[int, str] | None = None,
        query_instruction_format: str = "{}{}",
        dataset_instructions: Mapping[str, str] | None = None,
        passage_instruction: str | None = None,
        passage_instruction_format: str = "{}{}",
        use_teacher_scores: bool = False,
    ) -> None:
        if train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
        if len(records) == 0:
            raise ValueError("no training records")
        self.records = list(records)
        self.train_group_size = train_group_size
        self.seed = seed
        self.epoch = 0
        self.query_instruction = query_instruction
        self.query_instruction_format = query_instruction_format
        self.dataset_instructions = dict(dataset_instructions or {})
        self.passage_instruction = passage_instruction
        self.passage_instruction_format = passage_instruction_format
        self.use_teacher_scores = use_teacher_scores
        needed = train_group_size - 1
        self.num_filled = sum(1 for r in self.records if len(r.get("neg") or []) == 0 and needed > 0)
        self.num_repeated = sum(1 for r in self.records if 0 < len(r.get("neg") or []) < needed)
        if self.num_filled:
            logger.warning(
                "%d of %d records have no negatives; with train_group_size=%d their groups are filled with random "
                "passages of other records (never their own positives)",
                self.num_filled,
                len(self.records),
                train_group_size,
            )
        if self.num_filled == len(self.records) and needed > 0 and len(self.records) < 2:
            raise ValueError("cannot fill negatives: a single record and no negatives")
        if use_teacher_scores and self.num_filled:
            raise ValueError(
                f"{self.num_filled} records have no negatives, so their groups cannot carry teacher scores; "
                "give them `neg` and `neg_scores` or use train_group_size=1"
            )
        if self.num_repeated:
            logger.info(
                "%d records have fewer than %d negatives; they are sampled with repetition", self.num_repeated, needed
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def source_indices(self) -> list[int]:
        return [int(r.get("source_index", 0)) for r in self.records]

    def _query_instruction(self, record: Mapping[str, Any]) -> str | None:
        if record.get("prompt"):
            return record["prompt"]
        if self.dataset_instructions:
            for key in instruction_keys(str(record.get("source", ""))):
                if key in self.dataset_instructions:
                    return self.dataset_instructions[key]
        if isinstance(self.query_instruction, Mapping):
            return self.query_instruction.get(int(record.get("source_index", 0)))
        return self.query_instruction

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        pos_index = rng.randrange(len(record["pos"]))
        passages = [record["pos"][pos_index]]
        scores = [record["pos_scores"][pos_index]] if self.use_teacher_scores else None
        needed = self.train_group_size - 1
        negatives = record.get("neg") or []
        if needed > 0 and negatives:
            if len(negatives) >= needed:
                chosen = rng.sample(range(len(negatives)), needed)
            else:
                chosen = [rng.randrange(len(negatives)) for _ in range(needed)]
            passages.extend(negatives[i] for i in chosen)
            if scores is not None:
                scores.extend(record["neg_scores"][i] for i in chosen)
        elif needed > 0:
            own = set(record["pos"])
            attempts = 0
            while len(passages) < self.train_group_size:
                attempts += 1
                if attempts > 100 * self.train_group_size:
                    raise ValueError(f"{record.get('id', index)}: no other record offers a passage to fill the group")
                other = self.records[rng.randrange(len(self.records))]
                candidate = other["pos"][rng.randrange(len(other["pos"]))]
                if candidate not in own:
                    passages.append(candidate)
        query = format_instruction(record["query"], self._query_instruction(record), self.query_instruction_format)
        positives = list(record["pos"])
        if self.passage_instruction:
            passages = [
                format_instruction(p, self.passage_instruction, self.passage_instruction_format) for p in passages
            ]
            positives = [
                format_instruction(p, self.passage_instruction, self.passage_instruction_format) for p in positives
            ]
        item = {
            "query": query,
            "passages": passages,
            "positives": positives,
            "id": record.get("id", str(index)),
            "source_index": int(record.get("source_index", 0)),
        }
        if scores is not None:
            item["teacher_scores"] = scores
        return item
