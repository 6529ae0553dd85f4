"""BGE-M3 scores and loss against FlagEmbedding 1.4.2 and against float64 loop re-derivations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.distill import kl_div_loss, m3_kd_loss, teacher_distribution
from ark_hf.losses.infonce import group_columns
from ark_hf.losses.m3 import M3Loss, colbert_scores, dense_scores, sparse_scores
from ark_hf.models.outputs import EmbeddingOutput

fe_modeling = pytest.importorskip("FlagEmbedding.finetune.embedder.encoder_only.m3.modeling")

VOCAB = 40
TEMPERATURE = 0.02


@dataclass
class Leaves:
    """Leaf tensors of one side (queries or passages); the heads' outputs are functions of them."""

    dense: torch.Tensor  # [N, d], normalised
    weights_raw: torch.Tensor  # [N, L] sparse weights >= 0, before masking
    ids: torch.Tensor  # [N, L]
    weight_mask: torch.Tensor  # [N, L] 0 at padding and special tokens
    colbert_raw: torch.Tensor  # [N, L - 1, dc], before masking
    colbert_mask: torch.Tensor  # [N, L - 1]

    def weights(self) -> torch.Tensor:
        # As in the model, masked weights are exactly 0 and pass no gradient (FlagEmbedding's max over
        # [N, L, vocab] ties them with its zero fill and may route their gradient anywhere).
        return self.weights_raw * self.weight_mask

    def colbert(self) -> torch.Tensor:
        # As in the model: padded positions are zero vectors, so no gradient reaches them.
        return self.colbert_raw * self.colbert_mask[..., None]

    def output(self) -> EmbeddingOutput:
        return EmbeddingOutput(
            dense=self.dense,
            sparse_weights=self.weights(),
            input_ids=self.ids,
            colbert=self.colbert(),
            colbert_mask=self.colbert_mask,
        )

    def grads(self) -> list[torch.Tensor]:
        return [self.dense.grad, self.weights_raw.grad, self.colbert_raw.grad]


def _side(n, length, g, pad_colbert: bool, dim=8, colbert_dim=6) -> Leaves:
    ids = torch.randint(0, 12, (n, length), generator=g)  # small id range: repeated and shared tokens
    weights = torch.rand(n, length, generator=g, dtype=torch.float64)
    weight_mask = torch.ones(n, length)
    weight_mask[:, -1] = 0.0  # e.g. the padding or a special token
    mask = torch.ones(n, length - 1, dtype=torch.long)
    if pad_colbert:
        for row in range(n):
            mask[row, length - 1 - row % 3 :] = 0
    colbert = F.normalize(torch.randn(n, length - 1, colbert_dim, generator=g, dtype=torch.float64), dim=-1)
    return Leaves(
        dense=F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True),
        weights_raw=weights.requires_grad_(True),
        ids=ids,
        weight_mask=weight_mask,
        colbert_raw=colbert.requires_grad_(True),
        colbert_mask=mask,
    )


def _batch(seed=0, batch=3, group_size=3):
    g = torch.Generator().manual_seed(seed)
    # Queries have padded colbert tokens; passages none, so FlagEmbedding's max(0, .) quirk does not apply.
    query = _side(batch, 6, g, pad_colbert=True)
    passages = _side(batch * group_size, 7, g, pad_colbert=False)
    teacher = torch.randn(batch, group_size, generator=g, dtype=torch.float64) * 2
    return query, passages, teacher


def _clone(leaves: Leaves) -> Leaves:
    return Leaves(
        dense=leaves.dense.detach().clone().requires_grad_(True),
        weights_raw=leaves.weights_raw.detach().clone().requires_grad_(True),
        ids=leaves.ids,
        weight_mask=leaves.weight_mask,
        colbert_raw=leaves.colbert_raw.detach().clone().requires_grad_(True),
        colbert_mask=leaves.colbert_mask,
    )


class _Backbone(nn.Module):
    config = SimpleNamespace(vocab_size=VOCAB)


def _flagembedding_loss(query: Leaves, passages: Leaves, teacher, **model_kwargs) -> torch.Tensor:
    """FlagEmbedding's EncoderOnlyEmbedderM3Model.forward on precomputed head outputs."""
    model = fe_modeling.EncoderOnlyEmbedderM3Model(
        {"model": _Backbone(), "colbert_linear": nn.Identity(), "sparse_linear": nn.Identity()},
        temperature=TEMPERATURE,
        **model_kwargs,
    )

    def vocab_vectors(side: Leaves) -> torch.Tensor:
        # FlagEmbedding's training-time _sparse_embedding: [N, L, vocab] scatter, then max over tokens.
        zeros = torch.zeros(*side.ids.shape, VOCAB, dtype=side.weights_raw.dtype)
        return torch.scatter(zeros, -1, side.ids[..., None], side.weights()[..., None]).max(dim=1).values

    def features(side: Leaves) -> dict:
        # FlagEmbedding's colbert mask is the attention mask including CLS; it drops column 0 itself.
        attention_mask = torch.cat([torch.ones(side.ids.size(0), 1, dtype=torch.long), side.colbert_mask], dim=1)
        return {"attention_mask": attention_mask, "encoded": (side.dense, vocab_vectors(side), side.colbert())}

    model.encode = lambda f: f["encoded"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.tensor(tensor) copy warning: keeps the teacher in float64
        return model(features(query), features(passages), teacher_scores=teacher).loss


CASES = {
    "dense_only": (dict(unified_finetuning=False), dict(unified_finetuning=False), False),
    "unified": ({}, {}, False),
    "unified_self_distill": (dict(use_self_distill=True), dict(use_self_distill=True), False),
    "kl_div": (dict(kd_loss_type="kl_div"), dict(kd_loss_type="kl_div"), True),
    "kl_div_self_distill": (
        dict(kd_loss_type="kl_div", use_self_distill=True),
        dict(kd_loss_type="kl_div", use_self_distill=True),
        True,
    ),
    "m3_kd_loss": (dict(kd_loss_type="m3_kd_loss"), dict(kd_loss_type="m3_kd_loss"), True),
    "m3_kd_loss_dense_only": (
        dict(kd_loss_type="m3_kd_loss", unified_finetuning=False),
        dict(kd_loss_type="m3_kd_loss", unified_finetuning=False),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_m3_loss_matches_flagembedding(case):
    ours_kwargs, fe_kwargs, with_teacher = CASES[case]
    query, passages, teacher = _batch()
    q_fe, p_fe = _clone(query), _clone(passages)

    loss, components = M3Loss(temperature=TEMPERATURE, **ours_kwargs)(
        query.output(), passages.output(), RetrievalBatch(3, teacher_scores=teacher if with_teacher else None)
    )
    loss.backward()
    expected = _flagembedding_loss(q_fe, p_fe, teacher if with_teacher else None, **fe_kwargs)
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(query.grads() + passages.grads(), q_fe.grads() + p_fe.grads()):
        if theirs is None:  # dense-only: FlagEmbedding never touches the other heads
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    expected_keys = {"loss_dense"}
    if ours_kwargs.get("unified_finetuning", True):
        expected_keys |= {"loss_lex", "loss_mul", "loss_inter", "sparse/nonzero_tokens", "sparse/mean_weight"}
        if ours_kwargs.get("use_self_distill"):
            expected_keys.add("loss_self_distill")
    assert set(components) == expected_keys
    assert all(not c.requires_grad for c in components.values())


def test_self_distill_start_step():
    query, passages, _ = _batch(seed=1)
    kwargs = dict(temperature=TEMPERATURE, use_self_distill=True, self_distill_start_step=5)
    plain = M3Loss(temperature=TEMPERATURE)(query.output(), passages.output(), 3)[0]
    before, parts_before = M3Loss(**kwargs)(query.output(), passages.output(), 3, step=5)
    after, parts_after = M3Loss(**kwargs)(query.output(), passages.output(), 3, step=6)
    torch.testing.assert_close(before, plain)
    assert "loss_self_distill" not in parts_before
    torch.testing.assert_close(after, (plain + parts_after["loss_self_distill"]) / 2)


def test_teacher_requires_kd_loss_type():
    query, passages, teacher = _batch()
    with pytest.raises(ValueError, match="kd_loss_type"):
        M3Loss()(query.output(), passages.output(), RetrievalBatch(3, teacher_scores=teacher))


# ---------------------------------------------------------------------------------------------------------
# No in-batch negatives (FlagEmbedding's ensemble degenerates and m3_kd_loss raises there): loop re-derivation


def _lexical_dict(ids, weights) -> dict[int, torch.Tensor]:
    best: dict[int, torch.Tensor] = {}
    for token, weight in zip(ids.tolist(), weights):
        if token not in best or weight.item() > best[token].item():
            best[token] = weight
    return best


def _lexical_score(q_ids, q_w, p_ids, p_w) -> torch.Tensor:
    q_dict, p_dict = _lexical_dict(q_ids, q_w), _lexical_dict(p_ids, p_w)
    return sum((q_dict[t] * p_dict[t] for t in q_dict.keys() & p_dict.keys()), torch.zeros((), dtype=q_w.dtype))


def _maxsim(q_vecs, q_mask, p_vecs, p_mask) -> torch.Tensor:
    q_rows = [i for i in range(q_vecs.size(0)) if q_mask[i]]
    p_rows = [j for j in range(p_vecs.size(0)) if p_mask[j]]
    per_token = [torch.stack([torch.dot(q_vecs[i], p_vecs[j]) for j in p_rows]).max() for i in q_rows]
    return torch.stack(per_token).sum() / len(q_rows)


def _reference_head(rows, teacher_probs, kd_loss_type):
    """rows[b][k]: logit of query b's k-th group member. The loss of one head over own-group blocks."""
    ce = torch.stack([torch.logsumexp(torch.stack(r), 0) - r[0] for r in rows]).mean()
    if teacher_probs is None:
        return ce
    if kd_loss_type == "kl_div":
        kd = -torch.stack(
            [
                sum(teacher_probs[b, k] * (r[k] - torch.logsumexp(torch.stack(r), 0)) for k in range(len(r)))
                for b, r in enumerate(rows)
            ]
        ).mean()
        return kd + ce
    # m3_kd_loss: member i against members i..G-1 (earlier ones removed), weighted by the teacher.
    return sum(
        torch.stack(
            [teacher_probs[b, i] * (torch.logsumexp(torch.stack(r[i:]), 0) - r[i]) for b, r in enumerate(rows)]
        ).mean()
        for i in range(len(rows[0]))
    )


def _reference_soft_ce(teacher_rows, rows):
    return -torch.stack(
        [
            sum(t[k] * (r[k] - torch.logsumexp(torch.stack(r), 0)) for k in range(len(r)))
            for t, r in zip(teacher_rows, rows)
        ]
    ).mean()


def _reference_no_in_batch(query: Leaves, passages: Leaves, teacher, group_size, kd_loss_type, self_distill):
    t = TEMPERATURE
    q_col, p_col = query.colbert(), passages.colbert()
    q_w, p_w = query.weights(), passages.weights()
    dense, lex, mul, inter = [], [], [], []
    for b in range(query.dense.size(0)):
        members = range(b * group_size, (b + 1) * group_size)
        dense.append([torch.dot(query.dense[b], passages.dense[j]) / t for j in members])
        lex.append([_lexical_score(query.ids[b], q_w[b], passages.ids[j], p_w[j]) / t for j in members])
        mul.append([_maxsim(q_col[b], query.colbert_mask[b], p_col[j], passages.colbert_mask[j]) / t for j in members])
        inter.append([dense[b][k] + 0.3 * lex[b][k] + mul[b][k] for k in range(group_size)])
    probs = None if teacher is None else torch.softmax(teacher, dim=-1)
    heads = [_reference_head(rows, probs, kd_loss_type) for rows in (dense, inter, lex, mul)]
    loss = (heads[0] + heads[1] + 0.1 * heads[2] + heads[3]) / 4
    if self_distill:
        self_teacher = [torch.softmax(torch.stack(r).detach(), 0) for r in inter]
        distill = (
            _reference_soft_ce(self_teacher, dense)
            + 0.1 * _reference_soft_ce(self_teacher, lex)
            + _reference_soft_ce(self_teacher, mul)
        ) / 3
        loss = (loss + distill) / 2
    return loss


@pytest.mark.parametrize(
    ("kd_loss_type", "self_distill"),
    [(None, True), ("m3_kd_loss", False), ("m3_kd_loss", True), ("kl_div", False)],
    ids=["unified_self_distill", "m3_kd_loss", "m3_kd_loss_self_distill", "kl_div"],
)
def test_m3_loss_no_in_batch_matches_loop_reference(kd_loss_type, self_distill):
    query, passages, teacher = _batch(seed=2, batch=4, group_size=3)  # B > G: FlagEmbedding raises here
    teacher = teacher if kd_loss_type else None
    q_ref, p_ref = _clone(query), _clone(passages)

    loss, _ = M3Loss(
        temperature=TEMPERATURE, in_batch=False, kd_loss_type=kd_loss_type, use_self_distill=self_distill
    )(query.output(), passages.output(), RetrievalBatch(3, teacher_scores=teacher))
    loss.backward()
    expected = _reference_no_in_batch(q_ref, p_ref, teacher, 3, kd_loss_type, self_distill)
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(query.grads() + passages.grads(), q_ref.grads() + p_ref.grads()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Scores


def test_dense_scores():
    q, p = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = torch.tensor([[sum(q[i, k] * p[j, k] for k in range(4)) for j in range(3)] for i in range(2)])
    torch.testing.assert_close(dense_scores(q, p), expected.double())


def test_sparse_scores_match_dict_reference_with_repeated_tokens():
    g = torch.Generator().manual_seed(3)
    q_ids = torch.tensor([[5, 7, 5, 9, 0], [1000, 3, 3, 3, 0]])  # repeats; 1000: a large id, the compact vocab copes
    p_ids = torch.randint(0, 12, (4, 6), generator=g)
    p_ids[0, :3] = torch.tensor([5, 5, 1000])
    p_ids[3] = 11  # shares nothing with query 0
    q_w = torch.rand(2, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    p_w = torch.rand(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    q_ref, p_ref = q_w.detach().clone().requires_grad_(True), p_w.detach().clone().requires_grad_(True)

    scores = sparse_scores(q_ids, q_w, p_ids, p_w)
    expected = torch.stack(
        [torch.stack([_lexical_score(q_ids[i], q_ref[i], p_ids[j], p_ref[j]) for j in range(4)]) for i in range(2)]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    assert scores[0, 3] == 0
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (scores * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(q_w.grad, q_ref.grad)  # gradient reaches only the max occurrence of a token
    torch.testing.assert_close(p_w.grad, p_ref.grad)


@pytest.mark.parametrize("chunk", [None, 2])
def test_colbert_scores_with_padding_match_loop_reference(chunk):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    p = torch.randn(5, 6, 5, generator=g, dtype=torch.float64)
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    p_mask = torch.ones(5, 6, dtype=torch.long)
    p_mask[1, 2:] = 0
    p_mask[3, 1:] = 0
    q[q_mask == 0] = 0.0  # as the model outputs them
    p[p_mask == 0] = 0.0
    q.requires_grad_(True)
    p.requires_grad_(True)
    q_ref, p_ref = q.detach().clone().requires_grad_(True), p.detach().clone().requires_grad_(True)

    scores = colbert_scores(q, q_mask, p, p_mask, passage_chunk_size=chunk)
    expected = torch.stack(
        [torch.stack([_maxsim(q_ref[i], q_mask[i], p_ref[j], p_mask[j]) for j in range(5)]) for i in range(2)]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (scores * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    torch.testing.assert_close(p.grad, p_ref.grad)


def test_colbert_padding_differs_from_flagembedding_max_with_zero():
    """FlagEmbedding lets padded (zero) passage vectors into the max: max(0, best real match)."""
    q = -torch.ones(1, 1, 2, dtype=torch.float64)
    p = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)  # one real token, one padding
    ours = colbert_scores(q, torch.ones(1, 1), p, torch.tensor([[1, 0]]))
    model = SimpleNamespace(temperature=1.0)
    theirs = fe_modeling.EncoderOnlyEmbedderM3Model.compute_colbert_score(model, q, p, q_mask=torch.ones(1, 2))
    assert ours.item() == -2.0
    assert theirs.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# Distillation losses against FlagEmbedding's distill_loss (float32, as in training)


def test_m3_kd_loss_matches_flagembedding_float32():
    g = torch.Generator().manual_seed(5)
    batch, group_size = 4, 3
    scores = (torch.randn(batch, batch * group_size, generator=g) / TEMPERATURE).requires_grad_(True)
    scores_fe = scores.detach().clone().requires_grad_(True)
    probs = teacher_distribution(torch.randn(batch, group_size, generator=g))
    ours = m3_kd_loss(scores, probs, group_columns(batch, group_size))
    theirs = fe_modeling.EncoderOnlyEmbedderM3Model.distill_loss("m3_kd_loss", probs, scores_fe, group_size)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores.grad, scores_fe.grad, rtol=1e-6, atol=1e-6)


def test_m3_kd_loss_own_group_block_matches_loop_reference():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(4, 3, generator=g, dtype=torch.float64)
    probs = teacher_distribution(torch.randn(4, 3, generator=g, dtype=torch.float64), temperature=0.5)
    columns = torch.arange(3).expand(4, 3)
    rows = [list(scores[b]) for b in range(4)]
    expected = _reference_head(rows, probs, "m3_kd_loss")
    torch.testing.assert_close(m3_kd_loss(scores, probs, columns), expected)


def test_kl_div_and_teacher_distribution():
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(3, 4, generator=g, dtype=torch.float64)
    student = torch.randn(3, 4, generator=g, dtype=torch.float64)
    probs = teacher_distribution(teacher, temperature=2.0)
    torch.testing.assert_close(probs, torch.exp(teacher / 2) / torch.exp(teacher / 2).sum(-1, keepdim=True))
    expected = fe_modeling.EncoderOnlyEmbedderM3Model.distill_loss("kl_div", probs, student)
    torch.testing.assert_close(kl_div_loss(probs, student), expected)
    # Same gradient as KL(p || q): they differ by the teacher entropy, a constant.
    kl = F.kl_div(torch.log_softmax(student, -1), probs, reduction="batchmean")
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(kl_div_loss(probs, student), kl + entropy)
