"""What an embedder's forward pass returns: per-text outputs of each head, nothing about negatives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from ark_hf.models.tokenization import TextTokenizer

__all__ = [
    "M3_HEADS",
    "M3_HEAD_FIELDS",
    "EmbeddingOutput",
    "RetrieverModule",
    "RetrieverOutput",
    "fields_of_heads",
    "heads_of_fields",
    "truncate_embeddings",
]

# BGE-M3's heads, in their canonical order, and the `EmbeddingOutput` fields each one fills: the one definition the
# config (`heads`), the loss (`M3Loss.heads`) and the model (`BGEM3Model.set_training_outputs`) derive from.
M3_HEADS = ("dense", "sparse", "colbert")
M3_HEAD_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": ("dense",),
    "sparse": ("sparse_weights", "input_ids"),
    "colbert": ("colbert", "colbert_mask"),
}


def fields_of_heads(heads: Sequence[str]) -> tuple[str, ...]:
    """The `EmbeddingOutput` fields of `heads` (dense always first, then the heads in `M3_HEADS` order)."""
    unknown = [head for head in heads if head not in M3_HEADS]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; choose from {list(M3_HEADS)}")
    return tuple(field for head in M3_HEADS if head == "dense" or head in heads for field in M3_HEAD_FIELDS[head])


def heads_of_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """The heads whose outputs include any of `fields`, in `M3_HEADS` order."""
    return tuple(head for head in M3_HEADS if set(M3_HEAD_FIELDS[head]) & set(fields))


def truncate_embeddings(embeddings: torch.Tensor, dim: int, normalize: bool = True) -> torch.Tensor:
    """Matryoshka view: the first `dim` coordinates, L2-renormalised (slice first, then normalise)."""
    if not 0 < dim <= embeddings.shape[-1]:
        raise ValueError(f"dim must be in [1, {embeddings.shape[-1]}], got {dim}")
    sliced = embeddings[..., :dim]
    return F.normalize(sliced, p=2, dim=-1) if normalize else sliced


@dataclass
class EmbeddingOutput(ModelOutput):
    """Outputs for N texts.

    Attributes:
        dense: [N, d] sentence vectors (L2-normalised when the model normalises).
        sparse_weights: [N, L] lexical weight of each token, already 0 for padding and special tokens.
        input_ids: [N, L] token ids, aligned with `sparse_weights` (the sparse score matches on them).
        colbert: [N, L - 1, d_colbert] token vectors for positions 1..L-1 (CLS skipped), 0 at padding.
        colbert_mask: [N, L - 1] 1 for real tokens of `colbert`, 0 for padding.
    """

    dense: torch.Tensor | None = None
    sparse_weights: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    colbert: torch.Tensor | None = None
    colbert_mask: torch.Tensor | None = None


@dataclass
class RetrieverOutput(ModelOutput):
    """A training forward pass over queries and their passage groups."""

    query: EmbeddingOutput | None = None
    passages: EmbeddingOutput | None = None


class RetrieverModule(nn.Module):
    """Base of ark_hf's embedders: `forward` encodes queries and passages in one call.

    One forward per step keeps DDP's hooks (and DeepSpeed's) simple. Subclasses implement
    `encode_features(features) -> EmbeddingOutput` and `tokenize(texts, max_length)`. Extra batch keys (hashes,
    record ids, teacher scores) are the loss's business and are ignored here.
    """

    # the Trainer must not pass `num_items_in_batch`: the contrastive losses are means over queries
    accepts_loss_kwargs = False

    def encode_features(self, features: dict[str, torch.Tensor]) -> EmbeddingOutput:
        raise NotImplementedError

    def text_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None = None) -> TextTokenizer:
        """This model's tokenization rule, with its tokenizer (or `tokenizer`): `tokenize` uses it, and the trainer
        gives it to the collator, so training and inference tokenize alike. This base: the tokenizer's own
        special tokens, truncation to `max_length`."""
        return TextTokenizer(tokenizer if tokenizer is not None else self.tokenizer)

    def set_training_outputs(self, fields: Sequence[str]) -> None:
        """The `EmbeddingOutput` fields the loss reads (`RetrievalLoss.heads`), told by the trainer: a model may
        skip, in training, the outputs that nothing reads. This base computes the dense vectors only and refuses a
        loss that reads anything else."""
        extra = [field for field in fields if field != "dense"]
        if extra:
            raise ValueError(f"{type(self).__name__} outputs dense vectors only; the loss reads {extra}")

    def forward(
        self,
        query: dict[str, torch.Tensor] | None = None,
        passages: dict[str, torch.Tensor] | None = None,
        **_: Any,
    ) -> RetrieverOutput:
        return RetrieverOutput(
            query=self.encode_features(query) if query is not None else None,
            passages=self.encode_features(passages) if passages is not None else None,
        )
