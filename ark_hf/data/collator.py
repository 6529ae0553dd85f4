"""Batch collation: tokenize queries and passages (separate max lengths) and carry what the losses need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ark_hf.data.hashing import text_hash
from ark_hf.models.packing import PACKING_KEY, packing_index
from ark_hf.models.tokenization import TextTokenizer, tokenize_with_eos

__all__ = ["RetrievalCollator", "text_hash", "tokenize_with_eos"]


@dataclass
class RetrievalCollator:
    """Turns a list of `TrainGroupDataset` items into model inputs.

    Output keys: `query` and `passages` (each `input_ids` / `attention_mask`; passages are the B groups
    flattened, positive first in each group), `passage_hashes` ([B*G] content hashes, for false-negative
    masking), `positive_hashes` ([B, P] content hashes of each query's positives, padded with -1: an item's
    `positives` list, or its sampled positive when it has none), `record_ids` (for error messages), and
    `teacher_scores` ([B, G]) when the items carry them.

    Args:
        tokenizer: the model's tokenizer.
        query_max_len, passage_max_len: truncation lengths in tokens (special tokens included).
        pad_to_multiple_of: pad lengths to a multiple (8 helps tensor cores).
        append_eos_token_id: decoder embedders: tokenize without special tokens and append this EOS id.
        text_tokenizer: the model's tokenization rule (`model.text_tokenizer()`: what the trainer passes), so
            training tokenizes as `model.tokenize` does; when given, `tokenizer` and `append_eos_token_id` are
            not used.
        keep_texts: also return `query_texts` and `passage_texts` (an online teacher scores the raw texts).
        packing_index: also return, under `"packing"` in `query` and `passages`, where each real token goes in
            the packed sequence (`ark_hf.models.packing.packing_index`), computed here on the host so that a
            padding-free step needs no device-to-host synchronisation. The trainer sets it when the model
            runs padding-free.
    """

    tokenizer: PreTrainedTokenizerBase
    query_max_len: int = 32
    passage_max_len: int = 128
    pad_to_multiple_of: int | None = None
    append_eos_token_id: int | None = None
    keep_texts: bool = False
    packing_index: bool = False
    text_tokenizer: TextTokenizer | None = None

    def _tokenize(self, texts: list[str], max_length: int) -> BatchEncoding:
        rule = self.text_tokenizer or TextTokenizer(self.tokenizer, self.append_eos_token_id)
        return rule(texts, max_length, self.pad_to_multiple_of)

    @staticmethod
    def _positive_hashes(items: list[dict[str, Any]]) -> torch.Tensor:
        """`[B, P]` hashes of every positive of each item (its sampled positive always among them), -1 padded."""
        rows = []
        for item in items:
            hashes = [text_hash(item["passages"][0])]
            for text in item.get("positives") or []:
                value = text_hash(text)
                if value not in hashes:
                    hashes.append(value)
            rows.append(hashes)
        width = max(len(row) for row in rows)
        return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        group_sizes = {len(item["passages"]) for item in items}
        if len(group_sizes) != 1:
            raise ValueError(f"all groups of a batch must have the same size, got sizes {sorted(group_sizes)}")
        queries = [item["query"] for item in items]
        passages = [p for item in items for p in item["passages"]]
        batch: dict[str, Any] = {
            "query": dict(self._tokenize(queries, self.query_max_len)),
            "passages": dict(self._tokenize(passages, self.passage_max_len)),
            "passage_hashes": torch.tensor([text_hash(p) for p in passages], dtype=torch.long),
            "positive_hashes": self._positive_hashes(items),
            "record_ids": [item.get("id") for item in items],
        }
        if self.packing_index:
            for side in ("query", "passages"):
                batch[side][PACKING_KEY] = packing_index(batch[side]["attention_mask"])
        if self.keep_texts:
            batch["query_texts"] = queries
            batch["passage_texts"] = passages
        if all("teacher_scores" in item for item in items):
            batch["teacher_scores"] = torch.tensor([item["teacher_scores"] for item in items], dtype=torch.float32)
        return batch
