"""What an embedder's forward pass returns: per-text outputs of each head, nothing about negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


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
