"""BGE-M3's three heads (dense, lexical, multi-vector), their scores and the unified training loss.

Reference: Chen et al., "BGE M3-Embedding" (2024), sec. 3.3, and FlagEmbedding 1.4.2
(`EncoderOnlyEmbedderM3Model.forward`), whose weighting this module reproduces exactly:

    s_inter = w_d s_dense + w_s s_lex + w_m s_mul            (1, 0.3, 1; each already / temperature)
    L       = (L_dense + L_inter + 0.1 L_lex + L_mul) / 4
    L'      = (L'_dense + 0.1 L'_lex + L'_mul) / 3,  L'_x = CE(softmax(s_inter).detach(), s_x)
    final   = (L + L') / 2 with self-distillation, else L

Score matrices follow the layout of `ark_hf.losses.infonce`: B queries, passages `[B * G]` with query b's
group at rows `b * G ...`, positive first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.losses.distill import kl_div_loss, m3_kd_loss, teacher_distribution
from ark_hf.losses.infonce import group_columns
from ark_hf.models.outputs import EmbeddingOutput
from ark_hf.utils.distributed import all_gather_with_grad, rank

M3_HEADS = ("dense", "sparse", "colbert")


def sparse_health(*weights: Tensor) -> dict[str, Tensor]:
    """Health of the lexical head on a batch: `sparse/nonzero_tokens` and `sparse/mean_weight` (detached).

    For each text (each row of each `[B, L]` weight matrix; queries and passages alike) n = the number of token
    positions with weight > 0 and m = the mean of those weights (0 when n = 0); the components are the means of n
    and m over the texts. A collapsing lexical head shows as n falling towards 0.
    """
    counts = torch.cat([(w.detach() > 0).sum(dim=1) for w in weights]).float()
    sums = torch.cat([w.detach().float().sum(dim=1) for w in weights])
    return {"sparse/nonzero_tokens": counts.mean(), "sparse/mean_weight": (sums / counts.clamp(min=1)).mean()}


def dense_scores(q: Tensor, p: Tensor) -> Tensor:
    """Dot products `[Bq, Bp]` of sentence vectors (cosine when they are normalised)."""
    return q @ p.T


def sparse_scores(q_ids: Tensor, q_weights: Tensor, p_ids: Tensor, p_weights: Tensor) -> Tensor:
    """Lexical matching scores `[Bq, Bp]`: sum over shared token ids of the product of their weights.

    `s_lex(q, p) = sum_{t in q and p} w_q(t) * w_p(t)`, where w_x(t) is the largest weight of token t in text
    x (a token repeated in a text counts once, with its max weight), as in BGE-M3.

    FlagEmbedding builds `[B, L, vocab]` during training (33 GB in float32 for 32 texts of 1024 tokens with
    XLM-R's 250k vocabulary).
    Here the ids of the batch are mapped to a compact vocabulary of the U ids that occur, giving `[B, U]`
    vectors and one matmul. Gradients reach the weight of the max occurrence of each token (split evenly
    between exact ties, where FlagEmbedding picks one).

    Args:
        q_ids, p_ids: `[Bq, Lq]`, `[Bp, Lp]` token ids.
        q_weights, p_weights: matching `>= 0` weights, already 0 at padding and special tokens.
    """
    ids = torch.cat([q_ids.reshape(-1), p_ids.reshape(-1)])
    vocab, compact = torch.unique(ids, return_inverse=True)
    n_vocab = vocab.numel()
    q_compact = compact[: q_ids.numel()].view_as(q_ids)
    p_compact = compact[q_ids.numel() :].view_as(p_ids)

    def to_vectors(ids_: Tensor, weights: Tensor) -> Tensor:
        # include_self=False: entries of tokens a text lacks stay 0, the others are the max of its weights.
        vectors = weights.new_zeros(ids_.size(0), n_vocab)
        return vectors.scatter_reduce(1, ids_, weights, reduce="amax", include_self=False)

    return to_vectors(q_compact, q_weights) @ to_vectors(p_compact, p_weights).T


def colbert_scores(
    q_vecs: Tensor,
    q_mask: Tensor,
    p_vecs: Tensor,
    p_mask: Tensor,
    *,
    passage_chunk_size: int | None = None,
) -> Tensor:
    """Late-interaction (ColBERT max-sim) scores `[Bq, Bp]`.

    `s_mul(q, p) = (1/N_q) sum_{real query tokens i} max_{real passage tokens j} q_i . p_j`, N_q the number
    of real query tokens. Padded query tokens contribute nothing; padded passage tokens are excluded from
    the max. FlagEmbedding leaves them in as zero vectors, so its max is `max(0, ...)`: the two differ only
    for a (query token, padded passage) pair whose best real match is negative.

    Args:
        q_vecs: `[Bq, Lq, d]` query token vectors.
        q_mask: `[Bq, Lq]` 1 for real query tokens.
        p_vecs: `[Bp, Lp, d]` passage token vectors.
        p_mask: `[Bp, Lp]` 1 for real passage tokens; every passage needs at least one.
        passage_chunk_size: score this many passages at a time, which bounds the `[Bq, Lq, chunk, Lp]`
            temporary (autograd keeps only the argmax indices); all at once by default.
    """
    q_mask = q_mask.bool()
    p_mask = p_mask.bool()
    chunk = passage_chunk_size or p_vecs.size(0)
    sums = []
    for start in range(0, p_vecs.size(0), chunk):
        token_scores = torch.einsum("qin,pjn->qipj", q_vecs, p_vecs[start : start + chunk])
        token_scores = token_scores.masked_fill(~p_mask[None, None, start : start + chunk], float("-inf"))
        best = token_scores.max(dim=-1).values  # [Bq, Lq, chunk]
        sums.append(best.masked_fill(~q_mask[:, :, None], 0.0).sum(dim=1))
    return torch.cat(sums, dim=1) / q_mask.sum(dim=-1, keepdim=True).to(q_vecs.dtype)


class M3Loss(RetrievalLoss):
    """BGE-M3 unified fine-tuning loss, with self-distillation and teacher distillation.

    Each head x in (dense, lex, mul, inter) gets a loss on its score matrix S_x (divided by the temperature;
    the ensemble S_inter combines the three already-divided matrices):
      - no teacher: InfoNCE of the positive (`contrastive_loss`);
      - `kd_loss_type="kl_div"`: `kl_div_loss` on the own-group block plus InfoNCE;
      - `kd_loss_type="m3_kd_loss"`: `m3_kd_loss` alone.
    All heads use in-batch negatives, or only the query's own group with `in_batch=False`. The dense head
    alone may add the other ranks' passages (`negatives_cross_device`); the ensemble and self-distillation
    then use the local block of the dense scores, as in FlagEmbedding.

    Args (defaults are FlagEmbedding's):
        temperature: divides every head's scores (0.02, FlagEmbedding's training default).
        unified_finetuning: train all three heads and the ensemble; off: dense loss only.
        use_self_distill: add the self-distillation term L' (needs `unified_finetuning`).
        self_distill_start_step: L' is on when `step > self_distill_start_step`.
        ensemble_weights: (dense, sparse, colbert) weights of s_inter.
        loss_weights: (dense, inter, lex, mul) weights of L, combined as a weighted sum / 4.
        self_distill_weights: (dense, lex, mul) weights of L', combined as a weighted sum / 3.
        in_batch: passages of the other queries are negatives.
        negatives_cross_device: with `in_batch`, the dense head also scores the passages of all ranks
            (gradients exact under DDP; see `ark_hf.losses.infonce`).
        kd_loss_type: `"kl_div"` or `"m3_kd_loss"`; required to pass `teacher_scores`.
        teacher_temperature: teacher scores are divided by it before the softmax.
        train_heads: the heads trained, among `("dense", "sparse", "colbert")` (default: all three with
            `unified_finetuning`, else dense). Only these are scored; L is the weighted sum of their losses plus,
            with two heads or more, the loss of their ensemble, divided by the number of terms; L' distils the
            chosen heads' ensemble into each of them (divided by their number). All three: the formulas above.
            `loss_dense` is logged even when the dense head is not trained (it costs one matmul).

    Components: `loss_dense`, `loss_lex`, `loss_mul`, `loss_inter`, `loss_self_distill` as trained, and with the
    sparse head `sparse/nonzero_tokens` and `sparse/mean_weight` (`sparse_health`), where a collapsing lexical
    head shows up.

    Inputs (`forward(query, passages, batch, step)`):
        query / passages: `EmbeddingOutput` of B queries and B * G passages: `dense` always, plus
            `sparse_weights`, `input_ids`, `colbert`, `colbert_mask` with `unified_finetuning`.
        batch: `RetrievalBatch` (group size; `teacher_scores` `[B, G]` when distilling from a teacher).
        step: the global training step (gates self-distillation).

    Differences from FlagEmbedding: the sparse scores never build `[B, L, vocab]`; the ColBERT max runs over
    real passage tokens only; cross-device dense gradients are exact (see `ark_hf.utils.distributed`).

    Example:
        ```python
        loss = M3Loss(unified_finetuning=True, use_self_distill=True)
        trainer = BGETrainer(model=model, args=config, loss=loss)
        ```

    Reference: Chen et al., "M3-Embedding: Multi-Linguality, Multi-Functionality, Multi-Granularity Text
    Embeddings Through Self-Knowledge Distillation", arXiv:2402.03216.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.02,
        unified_finetuning: bool = True,
        use_self_distill: bool = False,
        self_distill_start_step: int = -1,
        ensemble_weights: tuple[float, float, float] = (1.0, 0.3, 1.0),
        loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 0.1, 1.0),
        self_distill_weights: tuple[float, float, float] = (1.0, 0.1, 1.0),
        in_batch: bool = True,
        negatives_cross_device: bool = False,
        kd_loss_type: str | None = None,
        teacher_temperature: float = 1.0,
        train_heads: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # heads trained, ensembled and self-distilled (`train_heads`); the gradient cache keeps their fields only
        self.train_heads = (
            tuple(train_heads) if train_heads is not None else M3_HEADS if unified_finetuning else ("dense",)
        )
        if not self.train_heads or set(self.train_heads) - set(M3_HEADS):
            raise ValueError(f"train_heads must name some of {M3_HEADS}, got {train_heads!r}")
        if not unified_finetuning and self.train_heads != ("dense",):
            raise ValueError(f"train_heads={self.train_heads} needs unified_finetuning=True")
        head_fields = {
            "dense": ("dense",),
            "sparse": ("sparse_weights", "input_ids"),
            "colbert": ("colbert", "colbert_mask"),
        }
        self.heads = ("dense",) + tuple(f for h in M3_HEADS[1:] if h in self.train_heads for f in head_fields[h])
        if kd_loss_type not in (None, "kl_div", "m3_kd_loss"):
            raise ValueError(f"kd_loss_type must be None, 'kl_div' or 'm3_kd_loss', got {kd_loss_type!r}")
        self.temperature = temperature
        self.unified_finetuning = unified_finetuning
        self.use_self_distill = use_self_distill
        self.self_distill_start_step = self_distill_start_step
        self.ensemble_weights = tuple(ensemble_weights)
        self.loss_weights = tuple(loss_weights)
        self.self_distill_weights = tuple(self_distill_weights)
        self.in_batch = in_batch
        self.negatives_cross_device = negatives_cross_device
        self.kd_loss_type = kd_loss_type
        self.teacher_temperature = teacher_temperature

    def _head_loss(self, scores: Tensor, columns: Tensor, teacher_probs: Tensor | None) -> Tensor:
        """Loss of one head; `columns[b]` are row b's own group in `scores`, the positive first."""
        if teacher_probs is None:
            return F.cross_entropy(scores, columns[:, 0])
        if self.kd_loss_type == "m3_kd_loss":
            return m3_kd_loss(scores, teacher_probs, columns)
        return kl_div_loss(teacher_probs, scores.gather(1, columns)) + F.cross_entropy(scores, columns[:, 0])

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        """Loss of this rank's queries; components (detached) `loss_dense`, and with unified fine-tuning
        `loss_lex`, `loss_mul`, `loss_inter`, plus `loss_self_distill` when it is active."""
        batch_size = query.dense.size(0)
        device = query.dense.device
        group_size = batch.group_size
        teacher_scores = batch.teacher_scores
        if teacher_scores is not None:
            teacher_scores = teacher_scores.to(device)
        teacher_probs = None
        if teacher_scores is not None:
            if self.kd_loss_type is None:
                raise ValueError("teacher_scores given but kd_loss_type is None")
            teacher_probs = teacher_distribution(
                teacher_scores.reshape(batch_size, group_size), self.teacher_temperature
            )

        own_columns = group_columns(batch_size, group_size, device=device)
        if self.in_batch:
            columns = own_columns
        else:
            # Every head keeps only the [B, G] block of the query's own group, where the group is columns 0..G-1.
            columns = torch.arange(group_size, device=device).expand(batch_size, group_size)

        def restrict(scores: Tensor) -> Tensor:
            return scores if self.in_batch else scores.gather(1, own_columns)

        t = self.temperature
        if self.in_batch and self.negatives_cross_device:
            offset = rank() * batch_size
            s_dense_all = dense_scores(query.dense, all_gather_with_grad(passages.dense)) / t
            loss_dense = self._head_loss(
                s_dense_all, group_columns(batch_size, group_size, offset, device=device), teacher_probs
            )
            # The ensemble and self-distillation use this rank's own passages only.
            s_dense = s_dense_all[:, offset * group_size : (offset + batch_size) * group_size]
        else:
            s_dense = restrict(dense_scores(query.dense, passages.dense) / t)
            loss_dense = self._head_loss(s_dense, columns, teacher_probs)
        components = {"loss_dense": loss_dense.detach()}
        if not self.unified_finetuning:
            return LossOutput(loss_dense, components)

        # only the chosen heads (`train_heads`) are scored, ensembled and self-distilled; all three: the formula above
        w_dense, w_lex, w_mul = self.ensemble_weights
        a_dense, a_inter, a_lex, a_mul = self.loss_weights
        b_dense, b_lex, b_mul = self.self_distill_weights
        chosen: dict[str, tuple[Tensor, float, float]] = {}  # head -> (scores, ensemble weight, self-distill weight)
        losses: dict[str, tuple[Tensor, float]] = {}  # component -> (loss, weight in L), in L's order
        if "dense" in self.train_heads:
            chosen["dense"] = (s_dense, w_dense, b_dense)
            losses["loss_dense"] = (loss_dense, a_dense)
        if "sparse" in self.train_heads:
            s_lex = restrict(
                sparse_scores(query.input_ids, query.sparse_weights, passages.input_ids, passages.sparse_weights) / t
            )
            chosen["sparse"] = (s_lex, w_lex, b_lex)
            components.update(sparse_health(query.sparse_weights, passages.sparse_weights))
        if "colbert" in self.train_heads:
            s_mul = restrict(
                colbert_scores(query.colbert, query.colbert_mask, passages.colbert, passages.colbert_mask) / t
            )
            chosen["colbert"] = (s_mul, w_mul, b_mul)
        s_inter = sum(w * scores for scores, w, _ in chosen.values()) if len(chosen) > 1 else None
        if s_inter is not None:
            losses["loss_inter"] = (self._head_loss(s_inter, columns, teacher_probs), a_inter)
        if "sparse" in chosen:
            losses["loss_lex"] = (self._head_loss(chosen["sparse"][0], columns, teacher_probs), a_lex)
        if "colbert" in chosen:
            losses["loss_mul"] = (self._head_loss(chosen["colbert"][0], columns, teacher_probs), a_mul)
        loss = sum(a * value for value, a in losses.values()) / len(losses)
        components.update({name: value.detach() for name, (value, _) in losses.items()})

        if self.use_self_distill and s_inter is not None and step > self.self_distill_start_step:
            self_teacher = torch.softmax(s_inter.detach(), dim=-1)
            loss_self_distill = sum(b * kl_div_loss(self_teacher, scores) for scores, _, b in chosen.values()) / len(
                chosen
            )
            loss = (loss + loss_self_distill) / 2
            components["loss_self_distill"] = loss_self_distill.detach()
        return LossOutput(loss, components)
