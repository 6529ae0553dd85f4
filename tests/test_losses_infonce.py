"""InfoNCE losses against float64 re-derivations written with explicit loops from the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ark_hf.losses.infonce import InfoNCELoss, contrastive_loss, group_columns
from ark_hf.losses.qwen3 import qwen3_infonce_loss


def _unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _reference_infonce(q, p, group_size, temperature, in_batch):
    """-(1/B) sum_b [s(q_b, p_b+)/t - log sum_{j in candidates(b)} e^{s(q_b, p_j)/t}], loop by loop."""
    losses = []
    for b in range(q.size(0)):
        own = range(b * group_size, (b + 1) * group_size)
        candidates = range(p.size(0)) if in_batch else own
        logits = torch.stack([torch.dot(q[b], p[j]) / temperature for j in candidates])
        positive = torch.dot(q[b], p[b * group_size]) / temperature
        losses.append(torch.logsumexp(logits, dim=0) - positive)
    return torch.stack(losses).mean()


def test_group_columns():
    expected = torch.tensor([[6, 7, 8], [9, 10, 11]])
    assert torch.equal(group_columns(2, 3, query_offset=2), expected)
    assert torch.equal(group_columns(2, 1), torch.tensor([[0], [1]]))


@pytest.mark.parametrize(
    ("group_size", "in_batch"),
    [(1, True), (4, True), (4, False), (2, False)],
    ids=["G1", "hardneg", "no_in_batch", "G2-local"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infonce_matches_loop_reference(group_size, in_batch, dtype):
    g = torch.Generator().manual_seed(0)
    batch, dim, temperature = 3, 8, 0.05
    q0, p0 = _unit(batch, dim, generator=g), _unit(batch * group_size, dim, generator=g)

    q_ref, p_ref = _leaves(q0, p0)
    expected = _reference_infonce(q_ref, p_ref, group_size, temperature, in_batch)
    expected.backward()

    q, p = _leaves(q0, p0, dtype=dtype)
    output = InfoNCELoss(temperature=temperature, in_batch=in_batch)(q, p)
    loss, scores = output.loss, output.scores
    loss.backward()

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert scores.shape == (batch, batch * group_size)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    torch.testing.assert_close(q.grad.double(), q_ref.grad, **tol)
    torch.testing.assert_close(p.grad.double(), p_ref.grad, **tol)


def test_in_batch_negatives_change_the_loss():
    g = torch.Generator().manual_seed(1)
    q, p = _unit(3, 8, generator=g), _unit(6, 8, generator=g)
    in_batch = InfoNCELoss(temperature=0.05)(q, p)[0]
    local = InfoNCELoss(temperature=0.05, in_batch=False)(q, p)[0]
    assert not torch.allclose(in_batch, local)


def test_contrastive_loss_query_offset():
    """Rows of rank 1 of 2 (offset B) against 2 * B * G gathered columns: targets are (b + B) * G."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 2 * 2 * 3, generator=g, dtype=torch.float64)
    expected_in_batch = torch.stack([torch.logsumexp(scores[b], 0) - scores[b, (b + 2) * 3] for b in range(2)]).mean()
    expected_local = torch.stack(
        [torch.logsumexp(scores[b, (b + 2) * 3 : (b + 3) * 3], 0) - scores[b, (b + 2) * 3] for b in range(2)]
    ).mean()
    torch.testing.assert_close(contrastive_loss(scores, 3, query_offset=2), expected_in_batch)
    torch.testing.assert_close(contrastive_loss(scores, 3, in_batch=False, query_offset=2), expected_local)


def test_infonce_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups"):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(7, 4))


# ---------------------------------------------------------------------------------------------------------
# Qwen3-Embedding InfoNCE


def _reference_qwen3(
    q,
    d,
    group_size,
    *,
    temperature=0.05,
    margin=0.1,
    use_qq=True,
    use_dd=True,
    use_inbatch_qd=True,
    mask_false_negatives=True,
    doc_hashes=None,
):
    """The five-term Z_i of the report, one candidate at a time. Returns (loss, masked, kept negatives)."""
    n = q.size(0)
    losses, masked, kept = [], 0, 0
    for i in range(n):
        pos = i * group_size
        s_pos = torch.dot(q[i], d[pos])
        threshold = s_pos.item() + margin
        terms = [s_pos / temperature]

        def consider(s, threshold_rule, doc_index, terms=terms, threshold=threshold, pos=pos):
            nonlocal masked, kept
            is_false_negative = mask_false_negatives and (
                (threshold_rule and s.item() > threshold)
                or (doc_index is not None and doc_hashes is not None and doc_hashes[doc_index] == doc_hashes[pos])
            )
            if is_false_negative:
                masked += 1
            else:
                kept += 1
                terms.append(s / temperature)

        for k in range(1, group_size):  # own hard negatives
            consider(torch.dot(q[i], d[pos + k]), True, pos + k)
        if use_qq:
            for j in range(n):
                if j != i:
                    consider(torch.dot(q[i], q[j]), True, None)
        if use_dd:
            for j in range(d.size(0)):
                if j != pos:
                    consider(torch.dot(d[pos], d[j]), False, j)
        if use_inbatch_qd:
            for j in range(d.size(0)):
                if j // group_size != i:
                    consider(torch.dot(q[i], d[j]), True, j)
        losses.append(torch.logsumexp(torch.stack(terms), dim=0) - s_pos / temperature)
    return torch.stack(losses).mean(), masked, kept


def _qwen3_batch(seed=0, batch=4, group_size=3, dim=8):
    """Positives correlated with their queries, so the threshold rule masks some but not all candidates."""
    g = torch.Generator().manual_seed(seed)
    q = _unit(batch, dim, generator=g)
    d = _unit(batch * group_size, dim, generator=g)
    d[::group_size] = F.normalize(q + 1.2 * torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    hashes = torch.arange(batch * group_size) + 100
    return q, d, hashes


def _check_qwen3(q0, d0, group_size, dtype=torch.float64, **kwargs):
    kwargs.setdefault("temperature", 0.05)  # the reference's default (ours is Qwen3LossOptions' 0.1)
    q_ref, d_ref = _leaves(q0, d0)
    expected, masked, kept = _reference_qwen3(q_ref, d_ref, group_size, **kwargs)
    expected.backward()
    q, d = _leaves(q0, d0, dtype=dtype)
    loss, stats = qwen3_infonce_loss(q, d, group_size, **kwargs)
    loss.backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    torch.testing.assert_close(q.grad.double(), q_ref.grad, **tol)
    torch.testing.assert_close(d.grad.double(), d_ref.grad, **tol)
    assert int(stats["masked"]) == masked
    assert int(stats["candidates"]) == kept
    return loss.detach(), masked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qwen3_matches_loop_reference(dtype):
    q, d, hashes = _qwen3_batch()
    _, masked = _check_qwen3(q, d, 3, dtype=dtype, doc_hashes=hashes)
    assert masked > 0  # the threshold rule is exercised


def test_qwen3_duplicate_positive_is_masked_by_hash():
    """A copy of query 0's positive sits among query 2's hard negatives: same hash, different index."""
    q, d, hashes = _qwen3_batch(seed=3)
    group_size = 3
    d[2 * group_size + 1] = d[0]
    hashes[2 * group_size + 1] = hashes[0]
    with_hash, masked_with = _check_qwen3(q, d, group_size, doc_hashes=hashes)
    without_hash, masked_without = _check_qwen3(q, d, group_size)
    # The copy has s(q_0, copy) = s(q_0, d_0+), below the threshold: only the hash removes it, from the q-d
    # term and the d-d term (where s(d_0+, copy) = 1) of query 0.
    assert masked_with == masked_without + 2
    assert with_hash < without_hash


def test_qwen3_threshold_masks_a_too_similar_negative():
    q, d, hashes = _qwen3_batch(seed=4)
    group_size = 3
    # Query 1's first hard negative is almost the query itself, far above s(q_1, d_1+) + 0.1.
    d[group_size + 1] = F.normalize(q[1] + 0.01 * d[group_size + 1], dim=0)
    assert torch.dot(q[1], d[group_size + 1]) > torch.dot(q[1], d[group_size]) + 0.1
    masked_loss, _ = _check_qwen3(q, d, group_size, doc_hashes=hashes)
    unmasked_loss, masked = _check_qwen3(q, d, group_size, doc_hashes=hashes, mask_false_negatives=False)
    assert masked == 0
    assert unmasked_loss > masked_loss + 1.0  # e^{~1/0.05} in the denominator dominates when not masked


@pytest.mark.parametrize("switch", ["use_qq", "use_dd", "use_inbatch_qd"])
def test_qwen3_each_term_switch(switch):
    q, d, hashes = _qwen3_batch(seed=5)
    all_on, _ = _check_qwen3(q, d, 3, doc_hashes=hashes)
    off, _ = _check_qwen3(q, d, 3, doc_hashes=hashes, **{switch: False})
    assert not torch.allclose(all_on, off)


def test_qwen3_plain_in_batch_equals_infonce():
    """Without q-q, d-d and masking, the Qwen3 loss is the usual in-batch InfoNCE."""
    q, d, _ = _qwen3_batch(seed=6)
    loss, stats = qwen3_infonce_loss(q, d, 3, temperature=0.05, use_qq=False, use_dd=False, mask_false_negatives=False)
    torch.testing.assert_close(loss, _reference_infonce(q, d, 3, 0.05, in_batch=True))
    assert int(stats["candidates"]) == 4 * (12 - 1)


@pytest.mark.parametrize("use_qq", [False, True])
def test_qwen3_infonce_without_masks_is_sentence_transformers_mnrl(use_qq):
    """The objective bench/throughput.py gives the Qwen3 rows of both tools: ark_hf's InfoNCE with the
    false-negative mask and the d-d term off is sentence-transformers' MNRL (joint partition, query_to_doc
    [+ query_to_query]) on the same embeddings, values and gradients (float64)."""
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    util = pytest.importorskip("sentence_transformers.util")
    g = torch.Generator().manual_seed(7)
    batch, group, dim, temperature = 4, 3, 16, 0.02
    query, docs = _leaves(_unit(batch, dim, generator=g), _unit(batch * group, dim, generator=g))
    ours, _ = qwen3_infonce_loss(
        query, docs, group, temperature=temperature, use_qq=use_qq, use_dd=False, mask_false_negatives=False,
        mask_other_positives=False,
    )  # fmt: skip
    # sentence-transformers' columns: anchors, positives, then the k-th hard negative of every query
    q2, d2 = _leaves(query, docs)
    columns = [q2] + [d2.view(batch, group, dim)[:, k] for k in range(group)]
    directions = ("query_to_doc", "query_to_query") if use_qq else ("query_to_doc",)
    # dot product: both take unit vectors (cos_sim would renormalise, adding its projection to the gradients)
    mnrl = losses.MultipleNegativesRankingLoss(
        None, scale=1 / temperature, similarity_fct=util.dot_score, directions=directions
    )
    theirs = mnrl.compute_loss_from_embeddings(columns, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    (ours * 3).backward()  # a weight, so the gradients are not those of a normalised identity
    (theirs * 3).backward()
    torch.testing.assert_close(query.grad, q2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(docs.grad, d2.grad, rtol=1e-10, atol=1e-10)
