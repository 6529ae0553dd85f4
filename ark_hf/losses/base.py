"""The one call shape every ark_hf loss has: embeddings of every head in, `(loss, components)` out.

```python
output = loss(query, passages, batch, step)   # query/passages: EmbeddingOutput; batch: RetrievalBatch
output.loss          # the scalar to backpropagate
output.components    # detached scalars the trainer logs (loss_dense, loss_lex, masked_negatives, ...)
loss_value, components = output   # it unpacks like a tuple
```

A loss never calls the model and never tokenizes: it sees the heads' outputs (`EmbeddingOutput`: dense vectors;
sparse token ids + weights; ColBERT token vectors + masks) and the facts of the batch a loss may need
(`RetrievalBatch`: group size, content hashes, record ids, teacher scores). That is what lets one wrapper
(Matryoshka, GradCache) drive any loss, and what lets a user's loss go through the trainers' `loss=` argument
with no trainer code of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ark_hf.models.outputs import EmbeddingOutput

__all__ = ["LossOutput", "RetrievalBatch", "RetrievalLoss"]


@dataclass
class RetrievalBatch:
    """What a loss may know about a batch besides the embeddings.

    Layout (the same for every ark_hf loss): B queries; B * G passages with query b's group at rows
    `b * G ... b * G + G - 1`, its sampled positive first.

    Attributes:
        group_size: G, passages per query.
        passage_hashes: `[B * G]` int64 content hashes of the passages (equal texts, equal hashes, on any rank).
        positive_hashes: `[B, P]` int64 content hashes of *all* positives of each query (its `pos` list), padded
            with -1; a loss uses it to keep a query's other positives out of its negatives.
        record_ids: the records of the batch (for error messages).
        teacher_scores: `[B, G]` teacher scores of each group (precomputed or from an online teacher).
        query_texts, passage_texts: the raw texts, when a collator keeps them (an online teacher scores them).
    """

    group_size: int
    passage_hashes: Tensor | None = None
    positive_hashes: Tensor | None = None
    record_ids: list[Any] | None = None
    teacher_scores: Tensor | None = None
    query_texts: list[str] | None = None
    passage_texts: list[str] | None = None

    @classmethod
    def from_inputs(
        cls, inputs: Mapping[str, Any], group_size: int, device: torch.device | None = None
    ) -> RetrievalBatch:
        """The batch facts a collator put next to the model inputs (`RetrievalCollator`'s keys)."""

        def to_device(value: Tensor | None) -> Tensor | None:
            return value.to(device) if value is not None and device is not None else value

        return cls(
            group_size=group_size,
            passage_hashes=to_device(inputs.get("passage_hashes")),
            positive_hashes=to_device(inputs.get("positive_hashes")),
            record_ids=inputs.get("record_ids"),
            teacher_scores=to_device(inputs.get("teacher_scores")),
            query_texts=inputs.get("query_texts"),
            passage_texts=inputs.get("passage_texts"),
        )


@dataclass
class LossOutput:
    """A loss value and its named, detached components (what the trainer logs).

    Attributes:
        loss: the scalar to backpropagate.
        components: detached scalar tensors, e.g. `{"loss_dense": ..., "loss_lex": ...}`.
        scores: optionally the `[B, C]` logits the loss computed (for inspection and tests).
    """

    loss: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    scores: Tensor | None = None

    def __iter__(self) -> Iterator[Any]:  # `loss, components = output`
        return iter((self.loss, self.components))

    def __getitem__(self, index: int) -> Any:
        return (self.loss, self.components)[index]


def as_embeddings(value: EmbeddingOutput | Tensor) -> EmbeddingOutput:
    """A bare `[N, d]` tensor is read as dense vectors, so losses also run on plain tensors."""
    return value if isinstance(value, EmbeddingOutput) else EmbeddingOutput(dense=value)


def as_batch(batch: RetrievalBatch | int | None, n_queries: int, n_passages: int) -> RetrievalBatch:
    """A `RetrievalBatch`; an int is the group size, `None` infers it from the shapes."""
    if isinstance(batch, RetrievalBatch):
        group_size = batch.group_size
    else:
        group_size = int(batch) if batch is not None else (n_passages // n_queries if n_queries else 0)
        batch = RetrievalBatch(group_size=group_size)
    if n_queries == 0 or group_size < 1 or n_passages != n_queries * group_size:
        raise ValueError(
            f"{n_passages} passages do not split into groups of {group_size} for {n_queries} queries "
            "(expected B queries and B * G passages)"
        )
    return batch


class RetrievalLoss(nn.Module):
    """Base class of ark_hf's losses (and of yours): `forward(query, passages, batch, step) -> LossOutput`.

    Subclasses implement `compute(query, passages, batch, step)`; `forward` normalises its arguments first
    (a bare tensor becomes dense embeddings, an int the group size). Options that a curriculum stage may change
    are declared in `option_types` and live in `self.options`; `update_options(**overrides)` sets them to the
    values given at construction updated with `overrides` (not cumulative: each stage starts from the base).

    Attributes:
        option_types: name -> type of the options `update_options` accepts.
        heads: the `EmbeddingOutput` fields the loss reads (a gradient cache keeps exactly these).

    Example:
        ```python
        class AlignUniformLoss(RetrievalLoss):
            heads = ("dense",)

            def compute(self, query, passages, batch, step):
                positives = passages.dense[:: batch.group_size]
                align = (query.dense - positives).norm(dim=-1).pow(2).mean()
                return LossOutput(align, {"align": align.detach()})
        ```
    """

    option_types: dict[str, type] = {}
    heads: tuple[str, ...] = ("dense",)

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.check_options(options)
        self.base_options: dict[str, Any] = dict(options)
        self.options: dict[str, Any] = dict(options)

    def check_options(self, overrides: Mapping[str, Any], where: str = "") -> None:
        """Refuse unknown option names and wrong types (`where` prefixes the message, e.g. a stage name)."""
        prefix = f"{where}: " if where else ""
        for name, value in overrides.items():
            if name not in self.option_types:
                known = ", ".join(self.option_types) or "none"
                raise ValueError(f"{prefix}{type(self).__name__} has no option '{name}' (options: {known})")
            expected = self.option_types[name]
            ok = (
                isinstance(value, bool)
                if expected is bool
                else isinstance(value, expected) and not isinstance(value, bool)
            )
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{prefix}option '{name}' must be {expected.__name__}, got {value!r}")

    def check_stage_options(self, overrides: Mapping[str, Any], *, train_group_size: int, where: str = "") -> None:
        """Check a curriculum stage's overrides in the context of the run (its group size); refuse what cannot train."""
        self.check_options(overrides, where)

    def update_options(self, **overrides: Any) -> None:
        """Options for the coming steps: the constructor's, updated with `overrides` (a curriculum stage's)."""
        self.check_options(overrides)
        self.options = {**self.base_options, **overrides}

    def forward(
        self,
        query: EmbeddingOutput | Tensor,
        passages: EmbeddingOutput | Tensor,
        batch: RetrievalBatch | int | None = None,
        step: int = 0,
    ) -> LossOutput:
        query, passages = as_embeddings(query), as_embeddings(passages)
        batch = as_batch(batch, query.dense.size(0), passages.dense.size(0))
        return self.compute(query, passages, batch, step)

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        raise NotImplementedError
