"""BGE-M3's three heads (dense, lexical, multi-vector), their scores and the unified training loss.

Reference: Chen et al., "BGE M3-Embedding" (2024), sec. 3.3, and FlagEmbedding 1.4.2
(`EncoderOnlyEmbedderM3Model.forward`), whose weighting this module reproduces exactly:

    s_inter = w_d s_dense + w_s s_lex + w_m s_mul            (1, 0.3, 1; each already / temperature)
    L       = (L_dense + L_inter + 0.1 L_lex + L_mul) / 4
    L'      = (L'_dense + 0.1 L'_lex + L'_mul) / 3,  L'_x = CE(softmax(s_inter).detach(), s_x)
    final   = (L + L') / 2 with self-distillation, else L

Score matrices follow the layout of `ark_hf.losses.infonce`: B queries, passages `[B * G]` with query b's
group at rows `b * G ...`, positive first. Every head may take its negatives from all ranks, with exact gradients
(`M3Loss`, `cross_device_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.losses.distill import kl_div_loss, m3_kd_loss, teacher_distribution
from ark_hf.losses.infonce import group_columns, other_positive_mask
from ark_hf.models.outputs import M3_HEADS, EmbeddingOutput, fields_of_heads
from ark_hf.utils.distributed import all_gather_no_grad, all_gather_padded, all_gather_with_grad, rank


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
    Here the ids of the queries are mapped to a compact vocabulary of the U_q ids that occur in them (a passage
    token no query has adds nothing to any score), giving `[Bq, U_q]` and `[Bp, U_q]` vectors and one matmul:
    memory `(Bq + Bp) * U_q` floats, U_q <= Bq * Lq. Gradients reach the weight of the max occurrence of each
    token (split evenly between exact ties, where FlagEmbedding picks one).

    Args:
        q_ids, p_ids: `[Bq, Lq]`, `[Bp, Lp]` token ids; a negative id (the padding of a cross-device gather)
            matches nothing.
        q_weights, p_weights: matching `>= 0` weights, already 0 at padding and special tokens.
    """
    vocab = torch.unique(q_ids)  # sorted
    n_vocab = vocab.numel()
    q_compact = torch.searchsorted(vocab, q_ids.contiguous())
    found = torch.searchsorted(vocab, p_ids.contiguous()).clamp_max(n_vocab - 1)
    # ids no query has go to one extra column, dropped before the matmul
    p_compact = torch.where(vocab[found] == p_ids, found, torch.full_like(found, n_vocab))

    def to_vectors(ids_: Tensor, weights: Tensor, width: int) -> Tensor:
        # include_self=False: entries of tokens a text lacks stay 0, the others are the max of its weights.
        vectors = weights.new_zeros(ids_.size(0), width)
        return vectors.scatter_reduce(1, ids_, weights, reduce="amax", include_self=False)

    return to_vectors(q_compact, q_weights, n_vocab) @ to_vectors(p_compact, p_weights, n_vocab + 1)[:, :n_vocab].T


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


# elements of one ColBERT chunk's [Bq, Lq, chunk, Lp] token-score temporary when no chunk size is given
COLBERT_CHUNK_ELEMENTS = 2**27


class M3Loss(RetrievalLoss):
    """BGE-M3 unified fine-tuning loss, with self-distillation and teacher distillation.

    Each head x in (dense, lex, mul, inter) gets a loss on its score matrix S_x (divided by the temperature;
    the ensemble S_inter combines the three already-divided matrices):
      - no teacher: InfoNCE of the positive (`contrastive_loss`);
      - `kd_loss_type="kl_div"`: `kl_div_loss` on the own-group block plus InfoNCE;
      - `kd_loss_type="m3_kd_loss"`: `m3_kd_loss` alone.
    All heads use in-batch negatives, or only the query's own group with `in_batch=False`.

    Cross-device negatives (`negatives_cross_device`, with `in_batch`): each head named in `cross_device_heads`
    scores this rank's B queries against the passages of all W ranks (W * B * G columns), gathered with
    gradients, so the DDP-averaged gradient is the gradient of the global-batch loss (`ark_hf.losses.infonce`).
    Memory per head on each rank, N = W * B * G passages of Lp tokens:
      - dense: the gathered `[N, d]` vectors and the `[B, N]` scores;
      - sparse: the gathered ids and weights `[N, Lp]` (padded to the longest rank), and `[B + N, U_q]` compact
        lexical vectors, U_q the distinct token ids of this rank's queries (`sparse_scores`);
      - ColBERT: the gathered `[N, Lp, d_colbert]` token vectors and masks (by far the largest: 0.5 MiB a
        256-token passage at d 1024 in bf16), and a `[B, Lq, chunk, Lp]` temporary scored `colbert_chunk_size`
        passages at a time (autograd keeps only the `[B, Lq, N]` argmax indices).
    When every head the loss uses is gathered, the ensemble s_inter and self-distillation run over the global
    columns too: the ensemble ranks each query's candidates from every rank, exactly as one process would on the
    concatenated batch. FlagEmbedding gathers dense only and builds its ensemble and self-distillation from the
    *local* block of the dense scores; `cross_device_heads=("dense",)` gives that behaviour (any head left out is
    scored in-batch, and then the ensemble uses the local block of every head).

    Multi-positive awareness (`mask_other_positives`, docs/design.md 5.5): a column outside query b's own group whose
    content hash is one of b's positives (`batch.positive_hashes`, all of its `pos`, compared with
    `batch.passage_hashes`, gathered from every rank under cross-device negatives) is removed from b's
    candidates in every head, the ensemble and self-distillation (its logit becomes -inf). Without the two hash
    fields nothing is removed. Component `masked_positives`: entries removed on this rank.

    Args (defaults are FlagEmbedding's):
        temperature: divides every head's scores (0.02, FlagEmbedding's training default).
        unified_finetuning: train all three heads and the ensemble; off: dense loss only.
        use_self_distill: add the self-distillation term L' (needs `unified_finetuning`).
        self_distill_start_step: L' is on when `step > self_distill_start_step`.
        ensemble_weights: (dense, sparse, colbert) weights of s_inter.
        loss_weights: (dense, inter, lex, mul) weights of L, combined as a weighted sum / 4.
        self_distill_weights: (dense, lex, mul) weights of L', combined as a weighted sum / 3.
        in_batch: passages of the other queries are negatives.
        negatives_cross_device: with `in_batch`, the heads in `cross_device_heads` score the passages of all ranks.
        cross_device_heads: which of `"dense"`, `"sparse"`, `"colbert"` gather; `None`: every head the loss uses.
        mask_other_positives: remove a query's other positives from its negatives (needs the hash fields).
        colbert_chunk_size: passages per ColBERT max-sim chunk; `None`: as many as keep the temporary under
            2**27 elements.
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
        batch: `RetrievalBatch` (group size; `teacher_scores` `[B, G]` when distilling from a teacher;
            `passage_hashes` and `positive_hashes` for multi-positive awareness).
        step: the global training step (gates self-distillation).

    Differences from FlagEmbedding: the sparse scores never build `[B, L, vocab]`; the ColBERT max runs over
    real passage tokens only; cross-device gradients are exact, for every head; a query's other positives are
    not its negatives.

    Example:
        ```python
        loss = M3Loss(unified_finetuning=True, use_self_distill=True, negatives_cross_device=True)
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
        cross_device_heads: Sequence[str] | None = None,
        mask_other_positives: bool = True,
        colbert_chunk_size: int | None = None,
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
        self.heads = fields_of_heads(self.train_heads)  # the model computes, and the gradient cache keeps, these
        if kd_loss_type not in (None, "kl_div", "m3_kd_loss"):
            raise ValueError(f"kd_loss_type must be None, 'kl_div' or 'm3_kd_loss', got {kd_loss_type!r}")
        used = M3_HEADS if unified_finetuning else ("dense",)
        if cross_device_heads is None:
            cross_device_heads = used
        unknown = [head for head in cross_device_heads if head not in M3_HEADS]
        if unknown:
            raise ValueError(f"cross_device_heads: unknown head(s) {unknown}; choose from {list(M3_HEADS)}")
        if colbert_chunk_size is not None and colbert_chunk_size < 1:
            raise ValueError(f"colbert_chunk_size must be >= 1, got {colbert_chunk_size}")
        self.temperature = temperature
        self.unified_finetuning = unified_finetuning
        self.use_self_distill = use_self_distill
        self.self_distill_start_step = self_distill_start_step
        self.ensemble_weights = tuple(ensemble_weights)
        self.loss_weights = tuple(loss_weights)
        self.self_distill_weights = tuple(self_distill_weights)
        self.in_batch = in_batch
        self.negatives_cross_device = negatives_cross_device
        self.cross_device_heads = tuple(head for head in M3_HEADS if head in cross_device_heads)
        self.mask_other_positives = mask_other_positives
        self.colbert_chunk_size = colbert_chunk_size
        self.kd_loss_type = kd_loss_type
        self.teacher_temperature = teacher_temperature

    def _head_loss(self, scores: Tensor, columns: Tensor, teacher_probs: Tensor | None) -> Tensor:
        """Loss of one head; `columns[b]` are row b's own group in `scores`, the positive first."""
        if teacher_probs is None:
            return F.cross_entropy(scores, columns[:, 0])
        if self.kd_loss_type == "m3_kd_loss":
            return m3_kd_loss(scores, teacher_probs, columns)
        return kl_div_loss(teacher_probs, scores.gather(1, columns)) + F.cross_entropy(scores, columns[:, 0])

    def _colbert(self, query: EmbeddingOutput, p_vecs: Tensor, p_mask: Tensor) -> Tensor:
        chunk = self.colbert_chunk_size or max(
            1, COLBERT_CHUNK_ELEMENTS // max(1, query.colbert.size(0) * query.colbert.size(1) * p_vecs.size(1))
        )
        return colbert_scores(query.colbert, query.colbert_mask, p_vecs, p_mask, passage_chunk_size=chunk)

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        """Loss of this rank's queries; components (detached) `loss_dense`, and with unified fine-tuning
        `loss_lex`, `loss_mul`, `loss_inter`, plus `loss_self_distill` when it is active and `masked_positives`
        when the batch carries the hashes."""
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

        used = M3_HEADS if self.unified_finetuning else ("dense",)
        cross = self.in_batch and self.negatives_cross_device
        gathered = {head: cross and head in self.cross_device_heads for head in used}
        offset = rank() * batch_size if cross else 0
        local_columns = group_columns(batch_size, group_size, device=device)
        global_columns = group_columns(batch_size, group_size, offset, device=device)
        if not self.in_batch:
            # Every head keeps only the [B, G] block of the query's own group, where the group is columns 0..G-1.
            own_block = torch.arange(group_size, device=device).expand(batch_size, group_size)

        # multi-positive mask over local and (when some head gathers) global columns
        masks: dict[bool, Tensor | None] = {False: None, True: None}
        components: dict[str, Tensor] = {}
        if self.in_batch and self.mask_other_positives and batch.positive_hashes is not None:
            hashes = batch.passage_hashes
            if hashes is None:
                raise ValueError("positive_hashes given without passage_hashes: cannot find the other positives")
            positives = batch.positive_hashes.to(device)
            hashes = hashes.to(device)
            masks[False] = other_positive_mask(positives, hashes, local_columns)
            if any(gathered.values()):
                masks[True] = other_positive_mask(positives, all_gather_no_grad(hashes), global_columns)
            # counted over the widest columns any head scores (the global ones when a head gathers)
            components["masked_positives"] = (masks[True] if masks[True] is not None else masks[False]).sum()

        def finish(scores: Tensor, is_global: bool) -> Tensor:
            """Temperature, the own-group block without in-batch negatives, the multi-positive mask."""
            scores = scores / self.temperature
            if not self.in_batch:
                return scores.gather(1, local_columns)
            mask = masks[is_global]
            return scores.masked_fill(mask, float("-inf")) if mask is not None else scores

        def columns_of(is_global: bool) -> Tensor:
            if not self.in_batch:
                return own_block
            return global_columns if is_global else local_columns

        scores: dict[str, Tensor] = {}
        p_dense = all_gather_with_grad(passages.dense) if gathered["dense"] else passages.dense
        scores["dense"] = finish(dense_scores(query.dense, p_dense), gathered["dense"])
        loss_dense = self._head_loss(scores["dense"], columns_of(gathered["dense"]), teacher_probs)
        components["loss_dense"] = loss_dense.detach()
        if not self.unified_finetuning:
            return LossOutput(loss_dense, components)

        # Only the chosen heads (`train_heads`) are scored, ensembled and self-distilled; all three: the formula above.
        if "sparse" in self.train_heads:
            if gathered["sparse"]:
                p_ids = all_gather_padded(passages.input_ids, dim=1, pad_value=-1, with_grad=False)
                p_weights = all_gather_padded(passages.sparse_weights, dim=1, pad_value=0.0)
            else:
                p_ids, p_weights = passages.input_ids, passages.sparse_weights
            scores["sparse"] = finish(
                sparse_scores(query.input_ids, query.sparse_weights, p_ids, p_weights), gathered["sparse"]
            )
            components.update(sparse_health(query.sparse_weights, passages.sparse_weights))
        if "colbert" in self.train_heads:
            if gathered["colbert"]:
                p_vecs = all_gather_padded(passages.colbert, dim=1, pad_value=0.0)
                p_mask = all_gather_padded(passages.colbert_mask, dim=1, pad_value=0, with_grad=False)
            else:
                p_vecs, p_mask = passages.colbert, passages.colbert_mask
            scores["colbert"] = finish(self._colbert(query, p_vecs, p_mask), gathered["colbert"])

        w_dense, w_lex, w_mul = self.ensemble_weights
        a_dense, a_inter, a_lex, a_mul = self.loss_weights
        b_dense, b_lex, b_mul = self.self_distill_weights
        losses: dict[str, tuple[Tensor, float]] = {}  # component -> (loss, weight in L), in L's order
        if "dense" in self.train_heads:
            losses["loss_dense"] = (loss_dense, a_dense)
        head_weights = {"dense": (w_dense, b_dense), "sparse": (w_lex, b_lex), "colbert": (w_mul, b_mul)}
        chosen_heads = [head for head in M3_HEADS if head in self.train_heads]
        # The ensemble runs over the global columns when every chosen head has them, else over the local block.
        ensemble_global = all(gathered[head] for head in chosen_heads)
        local = slice(offset * group_size, (offset + batch_size) * group_size)
        ensemble_scores = {
            head: scores[head][:, local] if gathered[head] and not ensemble_global else scores[head]
            for head in chosen_heads
        }
        s_inter = None
        if len(chosen_heads) > 1:
            s_inter = sum(head_weights[head][0] * ensemble_scores[head] for head in chosen_heads)
            losses["loss_inter"] = (self._head_loss(s_inter, columns_of(ensemble_global), teacher_probs), a_inter)
        if "sparse" in scores:
            losses["loss_lex"] = (
                self._head_loss(scores["sparse"], columns_of(gathered["sparse"]), teacher_probs),
                a_lex,
            )
        if "colbert" in scores:
            losses["loss_mul"] = (
                self._head_loss(scores["colbert"], columns_of(gathered["colbert"]), teacher_probs),
                a_mul,
            )
        loss = sum(a * value for value, a in losses.values()) / len(losses)
        components.update({name: value.detach() for name, (value, _) in losses.items()})

        if self.use_self_distill and s_inter is not None and step > self.self_distill_start_step:
            self_teacher = torch.softmax(s_inter.detach(), dim=-1)
            loss_self_distill = sum(
                head_weights[head][1] * kl_div_loss(self_teacher, ensemble_scores[head]) for head in chosen_heads
            ) / len(chosen_heads)
            loss = (loss + loss_self_distill) / 2
            components["loss_self_distill"] = loss_self_distill.detach()
        return LossOutput(loss, components)
