"""Multi-positive awareness (docs/design.md 5.5): query A's second positive is query B's positive in the same
batch; its score leaves A's denominator in every head (dense, sparse, ColBERT, the ensemble, self-distillation), in
InfoNCE and in Qwen3's q-d and d-d terms. Checked against float64 re-derivations written here, loss and gradients;
the switch off gives the old losses; the collator fills `positive_hashes` from every item's `pos`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ark_hf.assets import build_xlmr_tokenizer
from ark_hf.data.collator import RetrievalCollator, text_hash
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.infonce import InfoNCELoss
from ark_hf.losses.m3 import M3Loss
from ark_hf.losses.qwen3 import Qwen3InfoNCELoss
from ark_hf.models.outputs import EmbeddingOutput

B, G, D, L, T = 3, 2, 4, 4, 0.2
# passage hashes: query b's group is columns 2b, 2b + 1; query 0's second positive (hash 20) is query 1's positive
HASHES = torch.tensor([10, 11, 20, 21, 30, 31])
POSITIVES = torch.tensor([[10, 20], [20, -1], [30, -1]])
MASKED = {(0, 2)}  # (row, column) removed from the denominators


def leaves(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    return {
        "q_dense": rand(B, D),
        "p_dense": rand(B * G, D),
        "q_ids": torch.randint(0, 6, (B, L), generator=g),
        "p_ids": torch.randint(0, 6, (B * G, L), generator=g),
        "q_w": torch.rand(B, L, generator=g, dtype=torch.float64).requires_grad_(True),
        "p_w": torch.rand(B * G, L, generator=g, dtype=torch.float64).requires_grad_(True),
        "q_col": rand(B, L, D),
        "p_col": rand(B * G, L, D),
    }


def outputs(x: dict) -> tuple[EmbeddingOutput, EmbeddingOutput]:
    ones_q, ones_p = torch.ones(B, L, dtype=torch.long), torch.ones(B * G, L, dtype=torch.long)
    query = EmbeddingOutput(x["q_dense"], x["q_w"], x["q_ids"], x["q_col"], ones_q)
    passages = EmbeddingOutput(x["p_dense"], x["p_w"], x["p_ids"], x["p_col"], ones_p)
    return query, passages


def reference_scores(x: dict) -> dict[str, list[list[torch.Tensor]]]:
    """Every head's score of query b and passage j, written out (divided by T)."""
    dense, lex, mul = [], [], []
    for b in range(B):
        q_lex = {}
        for t in range(L):
            token = int(x["q_ids"][b, t])
            q_lex[token] = torch.maximum(q_lex[token], x["q_w"][b, t]) if token in q_lex else x["q_w"][b, t]
        d_row, l_row, m_row = [], [], []
        for j in range(B * G):
            p_lex = {}
            for t in range(L):
                token = int(x["p_ids"][j, t])
                p_lex[token] = torch.maximum(p_lex[token], x["p_w"][j, t]) if token in p_lex else x["p_w"][j, t]
            d_row.append(sum(x["q_dense"][b, k] * x["p_dense"][j, k] for k in range(D)) / T)
            shared = [q_lex[t] * p_lex[t] for t in q_lex if t in p_lex]
            l_row.append(sum(shared, torch.zeros((), dtype=torch.float64)) / T)
            best = [max(x["q_col"][b, i] @ x["p_col"][j, k] for k in range(L)) for i in range(L)]
            m_row.append(sum(best) / L / T)
        dense.append(d_row)
        lex.append(l_row)
        mul.append(m_row)
    return {"dense": dense, "lex": lex, "mul": mul}


def kept(b: int, masked: set) -> list[int]:
    return [j for j in range(B * G) if (b, j) not in masked]


def ce(scores, b: int, masked: set) -> torch.Tensor:
    """-log softmax of the positive (column b * G) over the kept columns of row b."""
    return torch.logsumexp(torch.stack([scores[b][j] for j in kept(b, masked)]), 0) - scores[b][b * G]


def reference_m3(x: dict, masked: set) -> torch.Tensor:
    """Unified + self-distillation with FlagEmbedding's weights, over the kept columns only."""
    s = reference_scores(x)
    s["inter"] = [[s["dense"][b][j] + 0.3 * s["lex"][b][j] + s["mul"][b][j] for j in range(B * G)] for b in range(B)]
    head = {k: sum(ce(v, b, masked) for b in range(B)) / B for k, v in s.items()}
    loss = (head["dense"] + head["inter"] + 0.1 * head["lex"] + head["mul"]) / 4
    distill = {}
    for name in ("dense", "lex", "mul"):
        total = 0
        for b in range(B):
            cols = kept(b, masked)
            inter = torch.stack([s["inter"][b][j].detach() for j in cols])
            student = torch.stack([s[name][b][j] for j in cols])
            total = total - (inter.softmax(0) * student.log_softmax(0)).sum()
        distill[name] = total / B
    return (loss + (distill["dense"] + 0.1 * distill["lex"] + distill["mul"]) / 3) / 2


def grads_of(loss: torch.Tensor, x: dict) -> list[torch.Tensor]:
    names = ["q_dense", "p_dense", "q_w", "p_w", "q_col", "p_col"]
    return list(
        torch.autograd.grad(loss, [x[n] for n in names], allow_unused=True, materialize_grads=True, retain_graph=True)
    )


def batch(positives: torch.Tensor | None = POSITIVES) -> RetrievalBatch:
    return RetrievalBatch(G, passage_hashes=HASHES, positive_hashes=positives)


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "switch_off"])
def test_m3_every_head_drops_the_other_positive(mask):
    x = leaves()
    output = M3Loss(temperature=T, use_self_distill=True, mask_other_positives=mask)(*outputs(x), batch(), step=1)
    expected = reference_m3(x, MASKED if mask else set())
    torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads_of(output.loss, x), grads_of(expected, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if mask:
        assert int(output.components["masked_positives"]) == 1
        other = reference_m3(leaves(), set())
        assert not torch.isclose(expected, other)
    else:
        assert "masked_positives" not in output.components


def test_m3_head_scores_exclude_the_column_of_the_other_positive():
    """Each head's row 0 loses column 2, and nothing else: the ensemble (kd m3_kd_loss too) stays finite."""
    x = leaves(1)
    teacher = torch.linspace(0, 1, B * G, dtype=torch.float64).view(B, G)
    masked = M3Loss(temperature=T, use_self_distill=True, kd_loss_type="m3_kd_loss")(
        *outputs(x), RetrievalBatch(G, passage_hashes=HASHES, positive_hashes=POSITIVES, teacher_scores=teacher), 1
    )
    assert torch.isfinite(masked.loss)
    # without the hashes nothing is removed: the old behaviour
    plain = M3Loss(temperature=T, use_self_distill=True)(*outputs(x), RetrievalBatch(G), step=1).loss
    torch.testing.assert_close(plain, reference_m3(x, set()), rtol=1e-10, atol=1e-10)


def test_infonce_drops_the_other_positive():
    x = leaves(2)
    scores = reference_scores(x)["dense"]
    for mask, removed in ((True, MASKED), (False, set())):
        output = InfoNCELoss(temperature=T, mask_other_positives=mask)(x["q_dense"], x["p_dense"], batch())
        expected = sum(ce(scores, b, removed) for b in range(B)) / B
        torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads_of(output.loss, x)[:2], grads_of(expected, x)[:2]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_qwen3_qd_and_dd_terms_drop_the_other_positive():
    """Z_i = e^{s(q_i,d_i+)} + sum_j e^{s(q_i,d_j)} + sum_{j != i} e^{s(q_i,q_j)} + sum_j e^{s(d_i+,d_j)} over kept j."""
    x = leaves(3)
    q, d = F.normalize(x["q_dense"], dim=-1), F.normalize(x["p_dense"], dim=-1)
    for mask, removed in ((True, MASKED), (False, set())):
        total = 0
        for i in range(B):
            pos = i * G
            terms = [q[i] @ d[pos] / T]
            terms += [q[i] @ d[j] / T for j in kept(i, removed) if j != pos]
            terms += [q[i] @ q[j] / T for j in range(B) if j != i]
            terms += [d[pos] @ d[j] / T for j in kept(i, removed) if j != pos]
            total = total + torch.logsumexp(torch.stack(terms), 0) - q[i] @ d[pos] / T
        expected = total / B
        loss = Qwen3InfoNCELoss(temperature=T, mask_false_negatives=False, mask_other_positives=mask)
        output = loss(x["q_dense"], x["p_dense"], batch())
        torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads_of(output.loss, x)[:2], grads_of(expected, x)[:2]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert int(output.components.get("masked_positives", 0)) == (2 if mask else 0)  # q-d and d-d entries


def test_collator_carries_every_positive():
    records = [
        {"query": "q0", "pos": ["shared answer", "answer zero"], "neg": ["n0"], "id": "r0"},
        {"query": "q1", "pos": ["shared answer"], "neg": ["n1"], "id": "r1"},
    ]
    dataset = TrainGroupDataset(records, train_group_size=2, seed=1, passage_instruction="passage: ")
    items = [dataset[0], dataset[1]]
    assert items[0]["positives"] == ["passage: shared answer", "passage: answer zero"]
    out = RetrievalCollator(build_xlmr_tokenizer(), query_max_len=8, passage_max_len=8)(items)
    rows = out["positive_hashes"].tolist()
    assert rows[0][0] == text_hash(items[0]["passages"][0])  # the sampled positive first
    assert set(rows[0]) == {text_hash("passage: shared answer"), text_hash("passage: answer zero")}
    assert rows[1] == [text_hash("passage: shared answer"), -1]
    # the loss sees query 1's positive among query 0's positives: removed from query 0's row, and vice versa
    # when query 0 sampled "shared answer" (both queries share it)
    shared_for_0 = items[0]["passages"][0] == "passage: shared answer"
    x = torch.randn(2, 3, dtype=torch.float64)
    output = InfoNCELoss()(x, torch.randn(4, 3, dtype=torch.float64), RetrievalBatch.from_inputs(out, 2))
    assert int(output.components["masked_positives"]) == (2 if shared_for_0 else 1)
    assert not math.isnan(float(output.loss))
