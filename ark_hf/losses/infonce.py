"""InfoNCE (contrastive) losses for queries with groups of passages.

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
from torch import Tensor, nn

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


def _group_size(n_queries: int, n_passages: int) -> int:
    if n_queries == 0 or n_passages % n_queries != 0:
        raise ValueError(f"{n_passages} passages do not split into groups for {n_queries} queries")
    return n_passages // n_queries


class InfoNCELoss(nn.Module):
    """Dot-product InfoNCE with hard negatives and optional in-batch and cross-device negatives.

    `L = -(1/B) sum_b log softmax(q_b . p / temperature)[positive of b]`, the softmax running over every
    passage on the device (in-batch), of all devices (cross-device), or of the query's own group.
    Used by DPR/BGE/E5-style training; equals FlagEmbedding's `_compute_in_batch_neg_loss` and
    `_compute_no_in_batch_neg_loss` without a teacher.

    Args:
        temperature: logits are `q . p / temperature`; 0.02 is FlagEmbedding's training default.
        in_batch: passages of the other queries are negatives.
        cross_device: with `in_batch`, also the passages of the other ranks (see the module docstring for
            how gradients stay exact under DDP). Ignored without `in_batch`.
    """

    def __init__(self, temperature: float = 0.02, in_batch: bool = True, cross_device: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.in_batch = in_batch
        self.cross_device = cross_device

    def forward(self, query: Tensor, passages: Tensor) -> tuple[Tensor, Tensor]:
        """Loss of this rank's queries.

        Args:
            query: `[B, d]` query embeddings.
            passages: `[B * G, d]` passage embeddings, query b's group at rows `b * G ...`.

        Returns:
            `(loss, scores)`: the scalar mean over this rank's B queries and the `[B, C]` logits (C = W * B * G
            with cross-device negatives, else B * G).
        """
        group_size = _group_size(query.size(0), passages.size(0))
        offset = 0
        if self.in_batch and self.cross_device:
            passages = all_gather_with_grad(passages)
            offset = rank() * query.size(0)
        scores = query @ passages.T / self.temperature
        loss = contrastive_loss(scores, group_size, in_batch=self.in_batch, query_offset=offset)
        return loss, scores


def qwen3_infonce_loss(
    query: Tensor,
    docs: Tensor,
    group_size: int,
    *,
    temperature: float = 0.05,
    margin: float = 0.1,
    use_qq: bool = True,
    use_dd: bool = True,
    use_inbatch_qd: bool = True,
    mask_false_negatives: bool = True,
    doc_hashes: Tensor | None = None,
    cross_device: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The InfoNCE of the Qwen3-Embedding report (sec. 3.1), with false-negative masking.

    With cosine similarity s and temperature t, for query i with positive d_i+:

        L = -(1/N) sum_i log(e^{s(q_i, d_i+)/t} / Z_i)
        Z_i = e^{s(q_i, d_i+)/t}
            + sum_k      m_ik e^{s(q_i, d_ik-)/t}   own hard negatives (always)
            + sum_{j!=i} m_ij e^{s(q_i, q_j)/t}     other queries (`use_qq`)
            + sum_{j}    m_ij e^{s(d_i+, d_j)/t}    every batch document except d_i+ itself (`use_dd`)
            + sum_j      m_ij e^{s(q_i, d_j)/t}     documents outside the own group (`use_inbatch_qd`)

    False-negative mask (`mask_false_negatives`): m_ij = 0 when
      - the raw cosine s_ij > s(q_i, d_i+) + margin, with the positive score detached (q-d and q-q terms;
        a candidate far more similar to the query than its positive is likely an unlabelled positive), or
      - `doc_hashes[j] == doc_hashes[positive of i]` (q-d and d-d terms): a copy of the positive text
        elsewhere in the batch is not a negative. Matching by content, not index, is what ms-swift misses.
    The d-d term is masked only by the hash rule (its scores against d_i+ are not comparable to
    s(q_i, d_i+)). Masked entries become -inf before the log-sum-exp.

    Args:
        query: `[B, d]` L2-normalised query embeddings (the dot product is the cosine; not renormalised here).
        docs: `[B * G, d]` L2-normalised document embeddings, query b's group at rows `b * G ...`, positive first.
        group_size: G.
        temperature: t (sentence-transformers uses 0.05, ms-swift 0.1).
        margin: cosine margin of the threshold rule.
        use_qq, use_dd, use_inbatch_qd: switch the q-q, d-d and in-batch q-d terms.
        mask_false_negatives: apply both mask rules.
        doc_hashes: `[B * G]` integer content hashes of the documents; without them only the threshold
            rule applies.
        cross_device: candidates (queries, documents, hashes) come from all ranks; each rank returns the
            mean over its own queries, and gradients stay exact under DDP (module docstring).

    Returns:
        `(loss, stats)`, stats holding this rank's `masked` (candidate entries removed by the mask) and
        `candidates` (negative entries left in the denominators), as int64 tensors.
    """
    batch_size = query.size(0)
    if docs.size(0) != batch_size * group_size:
        raise ValueError(f"expected {batch_size * group_size} docs for {batch_size} queries, got {docs.size(0)}")
    if doc_hashes is not None and doc_hashes.shape != (docs.size(0),):
        raise ValueError(f"doc_hashes must have shape ({docs.size(0)},), got {tuple(doc_hashes.shape)}")

    all_docs, all_queries, all_hashes, offset = docs, query, doc_hashes, 0
    if cross_device:
        offset = rank() * batch_size
        all_docs = all_gather_with_grad(docs)
        if use_qq:
            all_queries = all_gather_with_grad(query)
        if doc_hashes is not None:
            all_hashes = all_gather_no_grad(doc_hashes)

    device = query.device
    rows = torch.arange(batch_size, device=device)
    own = group_columns(batch_size, group_size, offset, device=device)
    pos_cols = own[:, 0]

    s_qd = query @ all_docs.T  # [B, N] raw cosine, N = all documents
    is_pos = torch.zeros_like(s_qd, dtype=torch.bool)
    is_pos[rows, pos_cols] = True
    threshold = s_qd[rows, pos_cols].detach()[:, None] + margin
    same_as_pos = None
    if mask_false_negatives and all_hashes is not None:
        same_as_pos = all_hashes[None, :] == all_hashes[pos_cols][:, None]  # [B, N]

    def false_negatives(sim: Tensor, candidates: Tensor, threshold_rule: bool, hash_rule: bool) -> Tensor:
        """Candidates of one term removed by the mask rules that apply to it."""
        removed = torch.zeros_like(candidates)
        if mask_false_negatives and threshold_rule:
            removed |= sim > threshold
        if hash_rule and same_as_pos is not None:
            removed |= same_as_pos
        return removed & candidates

    # q-d: the own group always, other groups with in-batch negatives. The positive stays in: it is the target.
    qd_candidates = ~is_pos
    if not use_inbatch_qd:
        qd_candidates &= torch.zeros_like(is_pos).scatter_(1, own, True)
    qd_removed = false_negatives(s_qd, qd_candidates, threshold_rule=True, hash_rule=True)
    qd_keep = (qd_candidates & ~qd_removed) | is_pos
    blocks = [(s_qd / temperature).masked_fill(~qd_keep, float("-inf"))]
    candidates, removed = [qd_candidates], [qd_removed]

    if use_qq:
        s_qq = query @ all_queries.T  # [B, B'], B' = all queries
        qq_candidates = torch.ones_like(s_qq, dtype=torch.bool)
        qq_candidates[rows, rows + offset] = False
        qq_removed = false_negatives(s_qq, qq_candidates, threshold_rule=True, hash_rule=False)
        blocks.append((s_qq / temperature).masked_fill(~(qq_candidates & ~qq_removed), float("-inf")))
        candidates.append(qq_candidates)
        removed.append(qq_removed)

    if use_dd:
        s_dd = all_docs[pos_cols] @ all_docs.T  # [B, N]: own positive vs every document
        dd_candidates = ~is_pos
        dd_removed = false_negatives(s_dd, dd_candidates, threshold_rule=False, hash_rule=True)
        blocks.append((s_dd / temperature).masked_fill(~(dd_candidates & ~dd_removed), float("-inf")))
        candidates.append(dd_candidates)
        removed.append(dd_removed)

    # The positive sits at column pos_cols of the first block, so that is the target of the cross-entropy.
    loss = F.cross_entropy(torch.cat(blocks, dim=1), pos_cols)
    n_masked = torch.stack([r.sum() for r in removed]).sum()
    n_candidates = torch.stack([c.sum() for c in candidates]).sum() - n_masked
    return loss, {"masked": n_masked, "candidates": n_candidates}
