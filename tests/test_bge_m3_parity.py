"""End-to-end parity of BGE-M3 training with FlagEmbedding 1.4.2's own model code.

The same tiny XLM-R folder (BGE-M3's architecture at test size, the real 250,002-id tokenizer, head files
written into it) is loaded twice: by FlagEmbedding's runner into `EncoderOnlyEmbedderM3Model` and by
`BGEM3Model`. One batch of real tokens goes through FlagEmbedding's `forward` (its training branch:
`self.training` is True, so the sparse head takes its `[N, L, vocab]` scatter path) and through `BGEM3Model`
+ `BGETrainer.compute_loss` (the wiring of config -> `M3Loss` that training uses). Loss values and the
gradients of every parameter (backbone and both heads) must agree.

Dropout is switched off in the folder's config (both models then stay in train mode). Passages all have the
same token length, so neither side pads them: FlagEmbedding lets padded passage positions into ColBERT's max
as zero vectors while ark_hf masks them (docs/design.md 4.1). Queries are padded.

Where FlagEmbedding is broken (own-group negatives with unified fine-tuning or `m3_kd_loss`, see
reference/flagembedding.md 2.5), a float64 loop re-derivation of docs/design.md 5.2/5.3 written here, from the
model's head outputs, is the reference; the same re-derivation is also checked against FlagEmbedding with
in-batch negatives, so the two references agree where both exist.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from ark_hf.models.bge_m3 import COLBERT_FILE, SPARSE_FILE, BGEM3Model
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer

fe_modeling = pytest.importorskip("FlagEmbedding.finetune.embedder.encoder_only.m3.modeling")
fe_runner = pytest.importorskip("FlagEmbedding.finetune.embedder.encoder_only.m3.runner")

TEMPERATURE = 0.02
COLBERT_DIM = 16  # differs from the hidden size (32), so a head loaded with the wrong shape would fail
GROUP_SIZE = 3
PASSAGE_LEN = 9  # every passage is longer than this, so all are truncated to exactly this many tokens
QUERIES = [
    "how do I renew a building permit",
    "what is the fee for a construction license in the city centre",
]
PASSAGES = [
    # query 0: positive, two negatives
    "A building permit can be renewed online before it expires, for a small fee, at the permit office.",
    "The city centre has new parking rules for delivery vans since the first of March this year.",
    "Construction noise is allowed on weekdays between eight in the morning and eight in the evening.",
    # query 1
    "The fee for a construction license in the city centre depends on the size of the project planned.",
    "Renew your library card at any branch; bring an identity document and proof of your address.",
    "Permit holders must display the building permit number on a sign visible from the street outside.",
]
TEACHER_SCORES = [[4.0, 1.5, -2.0], [3.0, -1.0, 0.5]]  # raw logits; p_T = softmax(scores) (temperature 1)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def m3_folder(tiny_xlmr_path, tmp_path_factory):
    """The tiny XLM-R with dropout off and non-trivial sparse/ColBERT head files (FlagEmbedding's layout)."""
    folder = tmp_path_factory.mktemp("m3_parity") / "model"
    shutil.copytree(tiny_xlmr_path, folder)
    # Dropout off in the config. Saved through AutoModel so that the pooler that FlagEmbedding's `AutoModel` adds
    # to XLM-R (unused by the loss; BGEM3Model leaves it out) is on disk instead of random at each load.
    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    backbone.save_pretrained(folder)
    generator = torch.Generator().manual_seed(7)
    hidden = backbone.config.hidden_size
    colbert = nn.Linear(hidden, COLBERT_DIM)
    sparse = nn.Linear(hidden, 1)
    with torch.no_grad():
        for linear in (colbert, sparse):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.1)
        sparse.bias.fill_(0.2)  # most tokens get a positive lexical weight, some are clipped by the relu
    torch.save(colbert.state_dict(), folder / COLBERT_FILE)
    torch.save(sparse.state_dict(), folder / SPARSE_FILE)
    return folder


@pytest.fixture(scope="module")
def tokenizer(m3_folder):
    """Loaded once (the 250k-id tokenizer takes seconds to load); shared by both models, never modified."""
    return AutoTokenizer.from_pretrained(m3_folder)


@pytest.fixture(scope="module")
def batch(tokenizer):
    query = dict(tokenizer(QUERIES, padding=True, truncation=True, max_length=16, return_tensors="pt"))
    passages = dict(tokenizer(PASSAGES, padding=True, truncation=True, max_length=PASSAGE_LEN, return_tensors="pt"))
    # the set-up the comparison relies on: padded queries, passages without any padding
    assert not bool(query["attention_mask"].all())
    assert passages["attention_mask"].shape[1] == PASSAGE_LEN and bool(passages["attention_mask"].all())
    # lexical overlap between queries and passages, so the sparse head's scores and gradients are not all 0
    shared = set(query["input_ids"][0].tolist()) & set(passages["input_ids"][0].tolist()) - {0, 1, 2}
    assert shared
    return query, passages


def _fe_model(folder, tokenizer, *, unified, self_distill, kd_loss_type, dtype, pooling="cls"):
    base = fe_runner.EncoderOnlyEmbedderM3Runner.get_model(str(folder), colbert_dim=COLBERT_DIM)
    model = fe_modeling.EncoderOnlyEmbedderM3Model(
        base,
        tokenizer=tokenizer,
        temperature=TEMPERATURE,
        normalize_embeddings=True,
        unified_finetuning=unified,
        use_self_distill=self_distill,
        kd_loss_type=kd_loss_type or "m3_kd_loss",
        sentence_pooling_method=pooling,
    )
    return model.to(dtype).train()


def _ark_trainer(
    folder,
    tokenizer,
    tmp_path,
    *,
    unified,
    self_distill,
    kd_loss_type,
    in_batch,
    dtype,
    preset="flagembedding",
    pooling="cls",
) -> BGETrainer:
    model = BGEM3Model(str(folder), unified_finetuning=unified, tokenizer=tokenizer, pooling=pooling)
    model = model.to(dtype).train()
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        train_group_size=GROUP_SIZE,
        temperature=TEMPERATURE,
        unified_finetuning=unified,
        use_self_distill=self_distill,
        knowledge_distillation=kd_loss_type is not None,
        kd_loss_type=kd_loss_type or "m3_kd_loss",
        in_batch_negatives=in_batch,
        loss_preset=preset,
    )
    return BGETrainer(model=model, args=config)


def _ark_loss(trainer: BGETrainer, batch, kd_loss_type) -> torch.Tensor:
    query, passages = batch
    inputs = {"query": dict(query), "passages": dict(passages)}
    if kd_loss_type is not None:
        inputs["teacher_scores"] = torch.tensor(TEACHER_SCORES)  # float32, as the collator gives them
    return trainer.compute_loss(trainer.model, inputs)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters() if ".pooler." not in name}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in model.state_dict().items() if ".pooler." not in name}


def _assert_same_grads(ours: nn.Module, reference: nn.Module, *, heads: bool, rtol: float, atol: float) -> None:
    ours_grads, ref_grads = _grads(ours), _grads(reference)
    assert set(ref_grads) <= set(ours_grads)
    for name, ref in ref_grads.items():
        assert ref is not None, f"{name}: no gradient in FlagEmbedding"
        assert ours_grads[name] is not None, f"{name}: no gradient in ark_hf"
        torch.testing.assert_close(ours_grads[name], ref, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    head_names = [n for n in ours_grads if n.startswith(("colbert_linear.", "sparse_linear."))]
    assert len(head_names) == 4
    for name in head_names:
        if heads:
            assert ours_grads[name] is not None and ours_grads[name].abs().sum() > 0, f"{name}: head not trained"
        else:  # dense-only training leaves the heads out of the graph
            assert ours_grads[name] is None, name
    # the comparison is not vacuous: the backbone's embedding and last layer receive gradient
    assert ref_grads["model.embeddings.word_embeddings.weight"].abs().sum() > 0
    assert ref_grads["model.encoder.layer.1.output.dense.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------- FlagEmbedding parity
FE_CASES = [
    # (unified, self_distill, kd_loss_type, in_batch)
    pytest.param(False, False, None, True, id="dense-only"),
    pytest.param(True, False, None, True, id="unified"),
    pytest.param(True, True, None, True, id="unified-self_distill"),
    pytest.param(False, False, "kl_div", True, id="dense-kl_div"),
    pytest.param(False, False, "m3_kd_loss", True, id="dense-m3_kd_loss"),
    pytest.param(True, False, "kl_div", True, id="unified-kl_div"),
    pytest.param(True, True, "kl_div", True, id="unified-self_distill-kl_div"),
    pytest.param(True, False, "m3_kd_loss", True, id="unified-m3_kd_loss"),
    pytest.param(True, True, "m3_kd_loss", True, id="unified-self_distill-m3_kd_loss"),
    # FlagEmbedding's own-group path works for the dense head alone (no ensemble, no m3_kd_loss)
    pytest.param(False, False, None, False, id="dense-no_in_batch"),
    pytest.param(False, False, "kl_div", False, id="dense-no_in_batch-kl_div"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("unified", "self_distill", "kd_loss_type", "in_batch"), FE_CASES)
def test_loss_and_gradients_match_flagembedding(
    m3_folder, tokenizer, batch, tmp_path, unified, self_distill, kd_loss_type, in_batch, dtype
):
    _check_against_flagembedding(
        m3_folder, tokenizer, batch, tmp_path, unified, self_distill, kd_loss_type, in_batch, dtype
    )


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_other_dense_poolings_match_flagembedding(m3_folder, tokenizer, batch, tmp_path, pooling):
    """Queries are right-padded, so last_token must find the last real token, not the last position."""
    _check_against_flagembedding(
        m3_folder, tokenizer, batch, tmp_path, True, True, "m3_kd_loss", True, torch.float64, pooling=pooling
    )


def _check_against_flagembedding(
    m3_folder, tokenizer, batch, tmp_path, unified, self_distill, kd_loss_type, in_batch, dtype, pooling="cls"
):
    query, passages = batch
    fe = _fe_model(
        m3_folder,
        tokenizer,
        unified=unified,
        self_distill=self_distill,
        kd_loss_type=kd_loss_type,
        dtype=dtype,
        pooling=pooling,
    )
    trainer = _ark_trainer(
        m3_folder,
        tokenizer,
        tmp_path,
        unified=unified,
        self_distill=self_distill,
        kd_loss_type=kd_loss_type,
        in_batch=in_batch,
        dtype=dtype,
        pooling=pooling,
    )
    ours = trainer.model
    # identical starting weights, backbone and heads (FlagEmbedding has no heads when unified fine-tuning is off)
    fe_state, ours_state = _state(fe), _state(ours)
    assert set(fe_state) == {n for n in ours_state if unified or not n.startswith(("colbert_", "sparse_"))}
    for name, value in fe_state.items():
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=0)

    fe_loss = fe(
        queries=dict(query),
        passages=dict(passages),
        teacher_scores=[s for row in TEACHER_SCORES for s in row] if kd_loss_type else None,
        no_in_batch_neg_flag=not in_batch,
    ).loss
    fe_loss.backward()
    loss = _ark_loss(trainer, batch, kd_loss_type)
    loss.backward()

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    assert loss.dtype == dtype and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), fe_loss.detach(), **tol)
    _assert_same_grads(ours, fe, heads=unified, **tol)
    # the components that BGETrainer logs are the ones of this batch
    assert trainer._component_counts["loss_dense"] == 1
    if unified:
        assert {"loss_lex", "loss_mul", "loss_inter"} <= set(trainer._component_sums)
        assert trainer._component_sums["loss_lex"] > 0
    assert ("loss_self_distill" in trainer._component_sums) == self_distill


# ------------------------------------------------------------------ float64 re-derivation (docs/design.md 5.2/5.3)
def _lexical(ids: torch.Tensor, weights: torch.Tensor) -> dict[int, torch.Tensor]:
    """token id -> max weight over its occurrences (weights are already 0 at padding and special tokens)."""
    out: dict[int, torch.Tensor] = {}
    for token, weight in zip(ids.tolist(), weights):
        out[token] = torch.maximum(out[token], weight) if token in out else weight
    return out


# (ensemble weights of s_dense, s_lex, s_mul; loss weights of L_dense, L_inter, L_lex, L_mul; self-distill weights)
WEIGHTS = {
    "flagembedding": ((1.0, 0.3, 1.0), (1.0, 1.0, 0.1, 1.0), (1.0, 0.1, 1.0)),  # FlagEmbedding's code
    "paper": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # the paper's equations
}


def _reference_scores(q, p, ensemble_weights) -> dict[str, torch.Tensor]:
    """Score matrices [B, B*G] (each / temperature) of every head, by explicit loops over texts and tokens."""
    n_q, n_p = q.dense.size(0), p.dense.size(0)
    q_lex = [_lexical(q.input_ids[i], q.sparse_weights[i]) for i in range(n_q)]
    p_lex = [_lexical(p.input_ids[j], p.sparse_weights[j]) for j in range(n_p)]
    dense, lex, mul = [], [], []
    for i in range(n_q):
        q_tokens = [q.colbert[i, a] for a in range(q.colbert.size(1)) if q.colbert_mask[i, a]]
        d_row, l_row, m_row = [], [], []
        for j in range(n_p):
            d_row.append(torch.dot(q.dense[i], p.dense[j]))
            shared = [q_lex[i][t] * p_lex[j][t] for t in q_lex[i] if t in p_lex[j]]
            l_row.append(torch.stack(shared).sum() if shared else q.dense.new_zeros(()))
            p_tokens = torch.stack([p.colbert[j, b] for b in range(p.colbert.size(1)) if p.colbert_mask[j, b]])
            m_row.append(torch.stack([(p_tokens @ v).max() for v in q_tokens]).sum() / len(q_tokens))
        dense.append(torch.stack(d_row))
        lex.append(torch.stack(l_row))
        mul.append(torch.stack(m_row))
    scores = {"dense": torch.stack(dense), "lex": torch.stack(lex), "mul": torch.stack(mul)}
    scores = {k: v / TEMPERATURE for k, v in scores.items()}
    w_dense, w_lex, w_mul = ensemble_weights
    scores["inter"] = w_dense * scores["dense"] + w_lex * scores["lex"] + w_mul * scores["mul"]
    return scores


def _reference_head_loss(scores, columns, teacher_probs, kd_loss_type):
    """docs/design.md 5.1/5.3 for one head; `columns[b]` = row b's own group in `scores`, the positive first."""
    batch_size, group_size = columns.shape
    log_probs = scores.log_softmax(dim=-1)
    info_nce = -torch.stack([log_probs[b, columns[b, 0]] for b in range(batch_size)]).mean()
    if kd_loss_type is None:
        return info_nce
    if kd_loss_type == "kl_div":  # -sum_i p_T(i) log softmax(own group)(i), plus the contrastive loss
        own = torch.stack([scores[b, columns[b]] for b in range(batch_size)]).log_softmax(dim=-1)
        return -(teacher_probs * own).sum(-1).mean() + info_nce
    # m3_kd_loss: sum_i mean_b p_T(b, i) * CE(S_b without group members 0..i-1, target group member i)
    total = scores.new_zeros(())
    for i in range(group_size):
        terms = []
        for b in range(batch_size):
            removed = set(columns[b, :i].tolist())
            kept = [c for c in range(scores.size(1)) if c not in removed]
            denominator = torch.logsumexp(scores[b, kept], dim=0)
            terms.append(teacher_probs[b, i] * (denominator - scores[b, columns[b, i]]))
        total = total + torch.stack(terms).mean()
    return total


def _reference_loss(q, p, *, unified, self_distill, kd_loss_type, in_batch, preset="flagembedding"):
    ensemble_weights, (a_dense, a_inter, a_lex, a_mul), (b_dense, b_lex, b_mul) = WEIGHTS[preset]
    batch_size = q.dense.size(0)
    group = torch.arange(batch_size)[:, None] * GROUP_SIZE + torch.arange(GROUP_SIZE)[None, :]
    if unified:
        scores = _reference_scores(q, p, ensemble_weights)
    else:
        scores = {"dense": (q.dense @ p.dense.T) / TEMPERATURE}
    if in_batch:
        columns = group
    else:  # only the query's own group: a [B, G] block, target column 0
        scores = {k: torch.stack([v[b, group[b]] for b in range(batch_size)]) for k, v in scores.items()}
        columns = torch.arange(GROUP_SIZE).expand(batch_size, GROUP_SIZE)
    teacher = None
    if kd_loss_type is not None:
        # the teacher distribution is an input: float32 scores as the collator gives them, softmax in float32
        teacher = torch.softmax(torch.tensor(TEACHER_SCORES), dim=-1).double()
    losses = {k: _reference_head_loss(v, columns, teacher, kd_loss_type) for k, v in scores.items()}
    if not unified:
        return losses["dense"]
    loss = (a_dense * losses["dense"] + a_inter * losses["inter"] + a_lex * losses["lex"] + a_mul * losses["mul"]) / 4
    if self_distill:
        target = torch.softmax(scores["inter"].detach(), dim=-1)

        def cross_entropy(student):
            return -(target * student.log_softmax(dim=-1)).sum(-1).mean()

        distill = (
            b_dense * cross_entropy(scores["dense"])
            + b_lex * cross_entropy(scores["lex"])
            + b_mul * cross_entropy(scores["mul"])
        ) / 3
        loss = (loss + distill) / 2
    return loss


REFERENCE_CASES = [
    # (unified, self_distill, kd_loss_type, preset)
    pytest.param(True, False, None, "flagembedding", id="unified"),
    pytest.param(True, True, None, "flagembedding", id="unified-self_distill"),
    pytest.param(False, False, "m3_kd_loss", "flagembedding", id="dense-m3_kd_loss"),
    pytest.param(True, False, "m3_kd_loss", "flagembedding", id="unified-m3_kd_loss"),
    pytest.param(True, True, "m3_kd_loss", "flagembedding", id="unified-self_distill-m3_kd_loss"),
    pytest.param(True, True, "kl_div", "flagembedding", id="unified-self_distill-kl_div"),
    pytest.param(True, True, "m3_kd_loss", "paper", id="paper_weights-unified-self_distill-m3_kd_loss"),
]


@pytest.mark.parametrize("in_batch", [False, True], ids=["no_in_batch", "in_batch"])
@pytest.mark.parametrize(("unified", "self_distill", "kd_loss_type", "preset"), REFERENCE_CASES)
def test_loss_and_gradients_match_float64_rederivation(
    m3_folder, tokenizer, batch, tmp_path, unified, self_distill, kd_loss_type, preset, in_batch
):
    trainer = _ark_trainer(
        m3_folder,
        tokenizer,
        tmp_path,
        unified=unified,
        self_distill=self_distill,
        kd_loss_type=kd_loss_type,
        in_batch=in_batch,
        dtype=torch.float64,
        preset=preset,
    )
    model = trainer.model
    loss = _ark_loss(trainer, batch, kd_loss_type)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    model.zero_grad(set_to_none=True)

    query, passages = batch
    model.unified_finetuning = True  # the reference reads the heads' outputs in every mode
    out = model(query=dict(query), passages=dict(passages))
    model.unified_finetuning = unified
    reference = _reference_loss(
        out.query,
        out.passages,
        unified=unified,
        self_distill=self_distill,
        kd_loss_type=kd_loss_type,
        in_batch=in_batch,
        preset=preset,
    )
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-10, atol=1e-10)
    reference_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert set(ours) == set(reference_grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert any(n.startswith("sparse_linear.") for n in ours) == unified
    assert any(n.startswith("colbert_linear.") for n in ours) == unified


def test_rederivation_sees_what_flagembedding_gets_wrong(m3_folder, tokenizer, batch):
    """Own-group negatives + m3_kd_loss: FlagEmbedding indexes a [B, G] matrix with in-batch labels (b * G)."""
    fe = _fe_model(
        m3_folder, tokenizer, unified=False, self_distill=False, kd_loss_type="m3_kd_loss", dtype=torch.float64
    )
    query, passages = batch
    with pytest.raises(IndexError):
        fe(
            queries=dict(query),
            passages=dict(passages),
            teacher_scores=[s for row in TEACHER_SCORES for s in row],
            no_in_batch_neg_flag=True,
        )
