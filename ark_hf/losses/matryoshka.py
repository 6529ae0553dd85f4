"""`MatryoshkaLoss`: train the leading coordinates of the dense vectors to embed on their own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.models.outputs import EmbeddingOutput, truncate_embeddings

__all__ = ["MatryoshkaLoss"]


class MatryoshkaLoss(RetrievalLoss):
    """Wrap any loss so that it is applied to several leading slices of the dense vectors.

    `L = sum_k w_k L_inner(first d_k coordinates of every dense vector, renormalised)`. Only the `dense` field is
    sliced; the other heads (sparse, ColBERT) pass through unchanged. Components: `loss_dim_<d>` per size, and
    the inner loss's own components from the largest size.

    Args:
        loss: the wrapped `RetrievalLoss`.
        dims: the sizes d_k (each at most the embedding size).
        weights: w_k (default 1 each).

    Options go to the wrapped loss (`update_options` and `check_stage_options` are forwarded).

    Example:
        ```python
        loss = MatryoshkaLoss(Qwen3InfoNCELoss(temperature=0.05), dims=[1024, 512, 256], weights=[1, 1, 1])
        ```

    Reference: Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022 (arXiv:2205.13147).
    """

    def __init__(self, loss: RetrievalLoss, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        dims = [int(dim) for dim in dims]
        weights = [float(w) for w in weights] if weights is not None else [1.0] * len(dims)
        if not dims or len(weights) != len(dims):
            raise ValueError(f"MatryoshkaLoss needs one weight per size, got dims={dims}, weights={weights}")
        self.loss = loss
        self.dims = dims
        self.weights = weights
        self.option_types = loss.option_types
        self.heads = loss.heads

    def check_options(self, overrides: Any, where: str = "") -> None:
        if hasattr(self, "loss"):
            self.loss.check_options(overrides, where)

    def update_options(self, **overrides: Any) -> None:
        self.loss.update_options(**overrides)

    def check_stage_options(self, overrides: dict, *, train_group_size: int, where: str = "") -> None:
        self.loss.check_stage_options(overrides, train_group_size=train_group_size, where=where)

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        total = query.dense.new_zeros(())
        components = {}
        largest = max(self.dims)
        for dim, weight in zip(self.dims, self.weights):
            output = self.loss(
                replace(query, dense=truncate_embeddings(query.dense, dim)),
                replace(passages, dense=truncate_embeddings(passages.dense, dim)),
                batch,
                step,
            )
            total = total + weight * output.loss
            components[f"loss_dim_{dim}"] = output.loss.detach()
            if dim == largest:
                components.update(output.components)
        return LossOutput(total, components)
