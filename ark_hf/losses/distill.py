"""Distillation of a teacher's ranking of each query's group into the student's scores.

The teacher (a cross-encoder, a bigger embedder, precomputed `pos_scores`/`neg_scores`, or the BGE-M3
ensemble in self-distillation) gives a score to each of a query's G passages; its softmax is the target
distribution. Reference: FlagEmbedding 1.4.2, `AbsEmbedderModel.distill_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def teacher_distribution(teacher_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """`softmax(teacher_scores / temperature)` over each query's group, detached.

    Args:
        teacher_scores: `[B, G]` raw teacher scores (logits of a cross-encoder, not probabilities: scores in
            [0, 1] give a nearly flat target at temperature 1).
        temperature: FlagEmbedding has no such argument, i.e. 1.0.
    """
    return torch.softmax(teacher_scores.detach() / temperature, dim=-1)


def kl_div_loss(teacher_probs: Tensor, student_scores: Tensor) -> Tensor:
    """Cross-entropy of the student's softmax against soft targets, mean over queries.

    `-(1/B) sum_b sum_k p_bk log softmax(student_b)_k`. This is FlagEmbedding's `"kl_div"`: it differs from
    KL(p || q) by the teacher's entropy, a constant for the student, so the gradients are the same.

    Args:
        teacher_probs: `[B, K]` target distributions (rows sum to 1).
        student_scores: `[B, K]` student logits over the same K candidates.
    """
    log_probs = torch.log_softmax(student_scores, dim=-1)
    # a candidate removed from the softmax (-inf logit, e.g. a query's other positive) has p = 0: 0, not 0 * -inf
    log_probs = log_probs.masked_fill(teacher_probs == 0, 0.0)
    return -(teacher_probs * log_probs).sum(dim=-1).mean()


def m3_kd_loss(scores: Tensor, teacher_probs: Tensor, columns: Tensor) -> Tensor:
    """BGE-M3's listwise distillation loss (Plackett-Luce style, weighted by the teacher).

    `L = sum_{i=0}^{G-1} mean_b p(b, i) * CE(S_b with columns[b, :i] removed, columns[b, i])`: the student
    should rank the group's i-th passage first among all candidates except passages 0..i-1 of the group,
    with a weight given by the teacher. The other columns (in-batch negatives) stay in every softmax. No
    hard-label term is added: the positive's term (i = 0) is weighted by p(b, 0).

    Args:
        scores: `[B, C]` student logits (already divided by the temperature).
        teacher_probs: `[B, G]` teacher distribution over each query's group.
        columns: `[B, G]` column of each group member in `scores`: `group_columns(B, G)` with in-batch
            negatives (FlagEmbedding's `distill_loss("m3_kd_loss")`), `arange(G)` per row for a `[B, G]`
            own-group block (where FlagEmbedding raises `IndexError`).
    """
    loss = scores.new_zeros(())
    for i in range(columns.size(1)):
        # -inf rather than FlagEmbedding's additive finfo.min: the removed entries get exactly 0
        # probability and no gradient; the target column is never removed, so the row stays finite.
        masked = scores.scatter(1, columns[:, :i], float("-inf")) if i > 0 else scores
        ce = F.cross_entropy(masked, columns[:, i], reduction="none")
        loss = loss + (teacher_probs[:, i] * ce).mean()
    return loss
