"""The InfoNCE of the Qwen3-Embedding report, with false-negative masking, as a function and as a loss module.

Layout as in `ark_hf.losses.infonce`: B queries; documents `[B * G, d]`, query b's group at rows `b * G ...`,
positive first. Cross-device candidates are gathered with gradients (exact under DDP; see
`ark_hf.utils.distributed`).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.losses.infonce import group_columns, other_positive_mask
from ark_hf.models.outputs import EmbeddingOutput
from ark_hf.utils.distributed import all_gather_no_grad, all_gather_with_grad, rank

__all__ = [
    "QWEN3_LOSS_OPTION_TYPES",
    "Qwen3InfoNCELoss",
    "Qwen3LossOptions",
    "check_qwen3_options",
    "qwen3_infonce_loss",
]


@dataclass
class Qwen3LossOptions:
    """The options of Qwen3-Embedding's InfoNCE, spelled once.

    `QwenTrainerConfig` inherits these fields (config keys and command-line flags), `Qwen3InfoNCELoss` takes them as
    keywords and a curriculum stage may override them (`QWEN3_LOSS_OPTION_TYPES`); `check` validates them, and the
    defaults of `qwen3_infonce_loss` are these.
    """

    temperature: float = field(
        default=0.1,
        metadata={"help": "Temperature of the InfoNCE (ms-swift's value; sentence-transformers uses 0.05)."},
    )
    false_negative_margin: float = field(
        default=0.1,
        metadata={"help": "A candidate whose cosine exceeds the positive's by more than this is masked."},
    )
    mask_false_negatives: bool = field(
        default=True,
        metadata={"help": "Mask likely false negatives (margin rule) and copies of the positive text (by hash)."},
    )
    in_batch_negatives: bool = field(
        default=True,
        metadata={"help": "Use in-batch terms (q-q', d-d', q-d'); off: each query sees only its own group."},
    )
    use_qq: bool = field(default=True, metadata={"help": "Other queries of the batch are negatives (q-q')."})
    use_dd: bool = field(
        default=True, metadata={"help": "Other documents of the batch are negatives of the positive (d-d')."}
    )
    use_inbatch_qd: bool = field(
        default=True, metadata={"help": "Other queries' documents are negatives of the query (q-d')."}
    )
    mask_other_positives: bool = field(
        default=True,
        metadata={"help": "Remove a query's other positives (all of `pos`, by content hash) from its negatives."},
    )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(Qwen3LossOptions))

    def as_dict(self) -> dict[str, float | bool]:
        """The options of this object (also of a config that inherits them) by name."""
        return {name: getattr(self, name) for name in self.option_names()}

    def check(self, *, train_group_size: int, negatives_cross_device: bool, where: str = "") -> None:
        """Refuse loss settings under which no query has a negative, or that contradict each other."""
        prefix = f"{where}: " if where else ""
        if not self.temperature > 0:
            raise ValueError(f"{prefix}temperature must be > 0, got {self.temperature}")
        if not self.false_negative_margin >= 0:
            raise ValueError(f"{prefix}false_negative_margin must be >= 0, got {self.false_negative_margin}")
        if negatives_cross_device and not self.in_batch_negatives:
            raise ValueError(
                f"{prefix}negatives_cross_device needs in_batch_negatives=True (it gathers in-batch candidates)"
            )
        any_in_batch_term = self.in_batch_negatives and (self.use_qq or self.use_dd or self.use_inbatch_qd)
        if train_group_size < 2 and not any_in_batch_term:
            raise ValueError(
                f"{prefix}no negatives: train_group_size={train_group_size} gives no hard negatives and the in-batch "
                "terms are off, so the loss would be 0 (QwenLM/Qwen3-Embedding#63); raise train_group_size or turn "
                "in_batch_negatives / use_inbatch_qd on"
            )


# The options a curriculum stage may override, with their types (config field names of `QwenTrainerConfig`).
QWEN3_LOSS_OPTION_TYPES: dict[str, type] = {
    name: hint
    for name, hint in typing.get_type_hints(Qwen3LossOptions).items()
    if name in Qwen3LossOptions.option_names()
}
_DEFAULTS = Qwen3LossOptions()


def qwen3_infonce_loss(
    query: Tensor,
    docs: Tensor,
    group_size: int,
    *,
    temperature: float = _DEFAULTS.temperature,
    false_negative_margin: float = _DEFAULTS.false_negative_margin,
    use_qq: bool = _DEFAULTS.use_qq,
    use_dd: bool = _DEFAULTS.use_dd,
    use_inbatch_qd: bool = _DEFAULTS.use_inbatch_qd,
    mask_false_negatives: bool = _DEFAULTS.mask_false_negatives,
    doc_hashes: Tensor | None = None,
    cross_device: bool = False,
    positive_hashes: Tensor | None = None,
    mask_other_positives: bool = _DEFAULTS.mask_other_positives,
    margin: float | None = None,
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

    Multi-positive rule (`mask_other_positives`, docs/design.md 5.5; needs `positive_hashes` and `doc_hashes`): a
    document outside query i's own group whose hash is any of i's positives (all of its `pos`) is removed from
    the q-d and d-d terms, on every rank. The content-hash rule above is its special case for the sampled positive.

    Args:
        query: `[B, d]` L2-normalised query embeddings (the dot product is the cosine; not renormalised here).
        docs: `[B * G, d]` L2-normalised document embeddings, query b's group at rows `b * G ...`, positive first.
        group_size: G.
        temperature: t (default `Qwen3LossOptions`' 0.1, ms-swift's; sentence-transformers uses 0.05).
        false_negative_margin: cosine margin of the threshold rule.
        use_qq, use_dd, use_inbatch_qd: switch the q-q, d-d and in-batch q-d terms.
        mask_false_negatives: apply both mask rules.
        doc_hashes: `[B * G]` integer content hashes of the documents; without them only the threshold
            rule applies.
        cross_device: candidates (queries, documents, hashes) come from all ranks; each rank returns the
            mean over its own queries, and gradients stay exact under DDP (module docstring).
        positive_hashes: `[B, P]` content hashes of each query's positives, padded with -1.
        mask_other_positives: apply the multi-positive rule.
        margin: deprecated spelling of `false_negative_margin`.

    Returns:
        `(loss, stats)`, stats holding this rank's `masked` (candidate entries removed by any rule),
        `candidates` (negative entries left in the denominators) and, with the multi-positive rule,
        `masked_positives` (entries it removed), as int64 tensors.
    """
    if margin is not None:
        warnings.warn(
            "qwen3_infonce_loss(margin=...) is deprecated; pass false_negative_margin=", FutureWarning, stacklevel=2
        )
        false_negative_margin = margin
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
    threshold = s_qd[rows, pos_cols].detach()[:, None] + false_negative_margin
    same_as_pos = None
    if mask_false_negatives and all_hashes is not None:
        same_as_pos = all_hashes[None, :] == all_hashes[pos_cols][:, None]  # [B, N]
    other_positive = None
    if mask_other_positives and positive_hashes is not None and all_hashes is not None:
        other_positive = other_positive_mask(positive_hashes, all_hashes, own)  # [B, N]
    positive_removed = []

    def false_negatives(sim: Tensor, candidates: Tensor, threshold_rule: bool, hash_rule: bool) -> Tensor:
        """Candidates of one term removed by the mask rules that apply to it."""
        removed = torch.zeros_like(candidates)
        if mask_false_negatives and threshold_rule:
            removed |= sim > threshold
        if hash_rule and same_as_pos is not None:
            removed |= same_as_pos
        if hash_rule and other_positive is not None:
            positive_removed.append((other_positive & candidates).sum())
            removed |= other_positive
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
    stats = {"masked": n_masked, "candidates": n_candidates}
    if other_positive is not None:
        stats["masked_positives"] = torch.stack(positive_removed).sum()
    return loss, stats


def check_qwen3_options(
    options: Mapping[str, Any], *, train_group_size: int, negatives_cross_device: bool, where: str = ""
) -> None:
    """`Qwen3LossOptions(**options).check(...)`: refuse settings under which no query has a negative."""
    Qwen3LossOptions(**options).check(
        train_group_size=train_group_size, negatives_cross_device=negatives_cross_device, where=where
    )


class Qwen3InfoNCELoss(RetrievalLoss):
    """`qwen3_infonce_loss` as a `RetrievalLoss`: Qwen3-Embedding's five-term InfoNCE with false-negative masking.

    The dense vectors are L2-normalised here (cosine similarity), then `qwen3_infonce_loss` runs with the
    options below; `update_options(**overrides)` changes them for the coming steps (a curriculum stage's `loss:`).

    Args:
        options: a `Qwen3LossOptions` (a `QwenTrainerConfig` is one); default: its defaults.
        **overrides: any of its fields by name (the `QwenTrainerConfig` fields of the same names):
        temperature: t (Qwen3/ms-swift 0.1 by default here; sentence-transformers uses 0.05).
        false_negative_margin: cosine margin of the threshold mask rule.
        mask_false_negatives: apply the mask (threshold and content-hash rules).
        in_batch_negatives: off: only the query's own group (hard negatives), no q-q, d-d or in-batch q-d terms.
        use_qq, use_dd, use_inbatch_qd: the q-q, d-d and in-batch q-d terms.
        mask_other_positives: a query's other positives (by content hash, any rank) are not its negatives.
        negatives_cross_device: candidates come from all ranks (with `in_batch_negatives`).

    Components: `masked_negatives` and `negatives` (candidates removed by the mask and left in the
    denominators, this rank's counts), and `masked_positives` (removed as another positive of the query) when
    the batch carries `positive_hashes`.

    Differences from ms-swift: the hash rule matches copies of the positive by content, not by index; q-q and
    d-d terms are switchable; cross-device gradients are exact (bench/results/swift_infonce_parity.md).

    Example:
        ```python
        loss = Qwen3InfoNCELoss(temperature=0.05, use_dd=False)
        trainer = QwenTrainer(model=model, args=config, loss=loss)
        ```

    Reference: Zhang et al., "Qwen3 Embedding: Advancing Text Embedding and Reranking Through Foundation
    Models", arXiv:2506.05176, sec. 3.1.
    """

    option_types = QWEN3_LOSS_OPTION_TYPES

    def __init__(
        self, options: Qwen3LossOptions | None = None, *, negatives_cross_device: bool = False, **overrides: Any
    ) -> None:
        options = options if options is not None else Qwen3LossOptions()
        self.check_options(overrides)  # unknown names and wrong types, named
        values = {**options.as_dict(), **overrides}
        for name, kind in QWEN3_LOSS_OPTION_TYPES.items():
            if kind is float:
                values[name] = float(values[name])
        super().__init__(**values)
        self.negatives_cross_device = negatives_cross_device

    def check_stage_options(self, overrides: dict, *, train_group_size: int, where: str = "") -> None:
        """Check a stage's overrides in the context of the run (group size, cross-device): no stage without
        negatives."""
        self.check_options(overrides, where)
        check_qwen3_options(
            {**self.base_options, **overrides},
            train_group_size=train_group_size,
            negatives_cross_device=self.negatives_cross_device,
            where=where,
        )

    def compute(
        self, query: EmbeddingOutput, passages: EmbeddingOutput, batch: RetrievalBatch, step: int
    ) -> LossOutput:
        options = self.options
        in_batch = options["in_batch_negatives"]
        hashes = batch.passage_hashes
        loss, stats = qwen3_infonce_loss(
            F.normalize(query.dense, dim=-1),
            F.normalize(passages.dense, dim=-1),
            batch.group_size,
            temperature=options["temperature"],
            false_negative_margin=options["false_negative_margin"],
            use_qq=in_batch and options["use_qq"],
            use_dd=in_batch and options["use_dd"],
            use_inbatch_qd=in_batch and options["use_inbatch_qd"],
            mask_false_negatives=options["mask_false_negatives"],
            doc_hashes=hashes.to(query.dense.device) if hashes is not None else None,
            cross_device=in_batch and self.negatives_cross_device,
            positive_hashes=batch.positive_hashes,
            mask_other_positives=options["mask_other_positives"],
        )
        components = {"masked_negatives": stats["masked"], "negatives": stats["candidates"]}
        if "masked_positives" in stats:
            components["masked_positives"] = stats["masked_positives"]
        return LossOutput(loss, components)
