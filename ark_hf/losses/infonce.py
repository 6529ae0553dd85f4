"""InfoNCE (contrastive) loss for queries with groups of passages, and the score-matrix helpers every loss shares.

Layout used throughout: B queries; passages flattened to `[B * G, d]`, where query b's group is rows
`b * G ... b * G + G - 1` with the positive first and G - 1 hard negatives after it.

Cross-device negatives: with `cross_device=True` each rank scores its *own* B queries against the
passages of all ranks, gathered with `all_gather_with_grad`, and takes the mean over its own queries.
The gradient of every rank's loss reaches the rank owning each passage, so the DDP average of parameter
gradients equals the gradient of the single-process loss on the concatenated global batch (mean over all
W * B queries), and the mean of the per-rank losses equals that loss. FlagEmbedding instead computes
the global loss on every rank with gradients only through local embeddings; its DDP-averaged gradient is
1/W of the global one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.models.outputs import EmbeddingOutput
from ark_hf.utils.distributed import all_gather_no_grad, all_gather_with_grad, rank


def group_columns(
    batch_size: int, group_size: int, query_offset: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Flat column index of each query's own group in a `[B, C]` score matrix.

    Args:
        batch_size: B, the number of query rows.
        group_size: G, passages per query (positive first).
        query_offset: global index of the first row's query; rank * B when the columns are the passages
            gathered from all ranks.
        device: device of the result.

    Returns:
        LongTensor `[B, G]`: row b is `(b + query_offset) * G + [0, ..., G - 1]`; column 0 is the positive.
    """
    queries = torch.arange(batch_size, device=device) + query_offset
    return queries[:, None] * group_size + torch.arange(group_size, device=device)[None, :]


def other_positive_mask(positive_hashes: Tensor, candidate_hashes: Tensor, own_columns: Tensor) -> Tensor:
    """Which candidates are one of the query's positives outside its own group (docs/design.md 5.5).

    A query may have several positives (`pos` is a list) and samples one per step; its other positives (and
    copies of the sampled one) can sit in the batch as other queries' passages. They are not its negatives.

    Args:
        positive_hashes: `[B, P]` content hashes of each query's positives, padded with -1 (never a hash).
        candidate_hashes: `[C]` content hashes of the score matrix's columns (all ranks' under cross-device).
        own_columns: `[B, G]` columns of each query's own group (`group_columns`), never removed: the sampled
            positive is the target, and the group's hard negatives are the data's own statement.

    Returns:
        BoolTensor `[B, C]`, True where the column should leave row b's softmax.
    """
    positive_hashes = positive_hashes.to(candidate_hashes.device)
    match = (candidate_hashes[None, :, None] == positive_hashes[:, None, :]) & (positive_hashes[:, None, :] >= 0)
    mask = match.any(dim=-1)
    return mask.scatter(1, own_columns, False)


def contrastive_loss(scores: Tensor, group_size: int, *, in_batch: bool = True, query_offset: int = 0) -> Tensor:
    """Mean cross-entropy of each query's positive among its candidates.

    Args:
        scores: `[B, C]` logits (already divided by the temperature), row b = query `b + query_offset`,
            columns = all passages in the layout of the module docstring.
        group_size: G.
        in_batch: every column is a candidate (the passages of the other queries are negatives, target
            column `(b + query_offset) * G`); otherwise only the query's own G columns (target 0).
        query_offset: global index of row 0 (rank * B with passages gathered across ranks).
    """
    columns = group_columns(scores.size(0), group_size, query_offset, device=scores.device)
    if in_batch:
        return F.cross_entropy(scores, columns[:, 0])
    own = scores.gather(1, columns)
    return F.cross_entropy(own, torch.zeros_like(columns[:, 0]))


class InfoNCELoss(RetrievalLoss):
    """Dot-product InfoNCE with hard negatives and optional in-batch and cross-device negatives.

    `L = -(1/B) sum_b log softmax(q_b . p / temperature)[positive of b]`, the softmax running over every
    passage on the device (in-batch), of all devices (cross-device), or of the query's own group.
    Used by DPR/BGE/E5-style training; equals FlagEmbedding's `_compute_in_batch_neg_loss` and
    `_compute_no_in_batch_neg_loss` without a teacher, and sentence-transformers' MNRL (scale = 1 / temperature)
    with one positive per query.

    Args:
        temperature: logits are `q . p / temperature`; 0.02 is FlagEmbedding's training default.
        in_batch: passages of the other queries are negatives.
        cross_device: with `in_batch`, also the passages of the other ranks (see the module docstring for
            how gradients stay exact under DDP). Ignored without `in_batch`.
        mask_other_positives: with `in_batch`, a passage outside query b's group whose content hash is one of b's
            positives (`batch.positive_hashes` against `batch.passage_hashes`, on any rank) is not b's negative
            (`other_positive_mask`); nothing is removed when the batch lacks the hashes. Component
            `masked_positives`: the entries removed on this rank.

    Inputs: `query` `[B, d]` and `passages` `[B * G, d]` dense vectors (or `EmbeddingOutput`s), query b's group
    at rows `b * G ...`; `batch` a `RetrievalBatch` or the group size (inferred from the shapes when omitted).
    The output's `scores` are the `[B, C]` logits (C = W * B * G with cross-device negatives, else B * G).

    Example:
        ```python
        loss = InfoNCELoss(temperature=0.05)
        output = loss(query_vectors, passage_vectors)   # output.loss, output.scores
        ```

    Reference: van den Oord et al., "Representation Learning with Contrastive Predictive Coding", arXiv:1807.03748.
    """

    option_types = {"temperature": float}

    def __init__(
        self,
        temperature: float = 0.02,
        in_batch: bool = True,
        cross_device: bool = False,
        mask_other_positives: bool = True,
    ) -> None:
        super().__init__(temperature=temperature)
        self.in_batch = in_batch
        self.cross_device = cross_device
        self.mask_other_positives = mask_other_positives

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        q, p = query.dense, passages.dense
        offset = 0
        cross = self.in_batch and self.cross_device
        if cross:
            p = all_gather_with_grad(p)
            offset = rank() * q.size(0)
        scores = q @ p.T / self.options["temperature"]
        components = {}
        if self.in_batch and self.mask_other_positives and batch.positive_hashes is not None:
            if batch.passage_hashes is None:
                raise ValueError("positive_hashes given without passage_hashes: cannot find the other positives")
            hashes = batch.passage_hashes.to(q.device)
            hashes = all_gather_no_grad(hashes) if cross else hashes
            own = group_columns(q.size(0), batch.group_size, offset, device=q.device)
            mask = other_positive_mask(batch.positive_hashes, hashes, own)
            scores = scores.masked_fill(mask, float("-inf"))
            components["masked_positives"] = mask.sum()
        loss = contrastive_loss(scores, batch.group_size, in_batch=self.in_batch, query_offset=offset)
        return LossOutput(loss, components, scores=scores)
