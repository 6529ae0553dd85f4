"""GradCache (`ark_hf.losses.cached`): the cached step gives the uncached loss and the same gradient of every
parameter, for every head and loss, with dropout (RNG replay), gradient checkpointing and LoRA; the trainers run
it through `mini_batch_size`; bad settings are refused before training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.cached import GradCache
from ark_hf.losses.m3 import M3Loss
from ark_hf.losses.matryoshka import MatryoshkaLoss
from ark_hf.losses.qwen3 import Qwen3InfoNCELoss
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder

B, G = 4, 3
QUERIES = [f"how do I renew permit {i} for the {w} district" for i, w in enumerate(["north", "old", "river", "hill"])]
PASSAGES = [
    f"{kind} {i}: " + " ".join(["renewals take"] * (1 + (i + j) % 3)) + f" {i + j} weeks at desk {j}."
    for i in range(B) for j, kind in enumerate(["Answer", "Parking note", "Library hours"])
]  # fmt: skip
PASSAGES[5] = PASSAGES[0]  # a copy of query 0's positive among query 1's negatives: the hash mask must see it


@pytest.fixture(scope="module")
def xlmr_tokenizer(tiny_xlmr_path):
    return AutoTokenizer.from_pretrained(tiny_xlmr_path)


def bge(path, tokenizer, *, dropout: bool = False, checkpointing: bool = False, unified: bool = True):
    torch.manual_seed(0)
    model = BGEM3Model(path, tokenizer=tokenizer, init_missing_heads=True, unified_finetuning=unified).double()
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def qwen(path, *, lora: bool = False):
    torch.manual_seed(0)
    model = DecoderEmbedder(path, lora=lora, lora_dropout=0.0)
    if lora:  # B starts at zero in peft: move it so the adapters' gradients are not trivially zero
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    return model.double().train()


def features(model, max_query: int = 16, max_passage: int = 24):
    return model.tokenize(QUERIES, max_query), model.tokenize(PASSAGES, max_passage)


def batch_of(model, q, p, teacher: bool = False) -> RetrievalBatch:
    from ark_hf.data.collator import text_hash

    scores = torch.linspace(-1, 2, B * G, dtype=torch.float64).view(B, G) if teacher else None
    return RetrievalBatch(G, passage_hashes=torch.tensor([text_hash(t) for t in PASSAGES]), teacher_scores=scores)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def uncached(model, loss, batch, q, p, step=1):
    model.zero_grad()
    out = model(query=q, passages=p)
    output = loss(out.query, out.passages, batch, step)
    output.loss.backward()
    return output, grads(model)


def chunked_reference(model, loss, batch, q, p, size, step=1):
    """Independent of the cache: forward each mini-batch *with* autograd, in the cache's order, then one backward.

    With dropout on, this draws the same masks as the cache's first pass (same generator, same order)."""
    model.zero_grad()
    from ark_hf.losses.cached import _concat, chunk_features

    qs = [model(passages=c).passages for c in chunk_features(q, size)]
    ps = [model(passages=c).passages for c in chunk_features(p, size)]
    output = loss(_concat(qs), _concat(ps), batch, step)
    output.loss.backward()
    return output, grads(model)


def cached(model, loss, batch, q, p, size, step=1):
    model.zero_grad()
    output = GradCache(size).step(
        encode=lambda f: model(passages=f).passages,
        query_features=q,
        passage_features=p,
        compute_loss=lambda qe, pe: loss(qe, pe, batch, step),
        backward=lambda t: t.backward(),
    )
    return output, grads(model)


def assert_same(expected, got, tol=1e-8):
    (out_a, grads_a), (out_b, grads_b) = expected, got
    torch.testing.assert_close(out_b.loss, out_a.loss.detach(), rtol=tol, atol=tol)
    assert out_a.components.keys() == out_b.components.keys()
    for key in out_a.components:
        torch.testing.assert_close(out_b.components[key].double(), out_a.components[key].double(), rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 4
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=name)


M3_CASES = {
    "dense": dict(unified_finetuning=False),
    "unified_self_distill": dict(unified_finetuning=True, use_self_distill=True),
    "m3_kd_loss": dict(unified_finetuning=True, use_self_distill=True, kd_loss_type="m3_kd_loss"),
    "kl_div": dict(unified_finetuning=True, kd_loss_type="kl_div"),
}


@pytest.mark.parametrize("case", list(M3_CASES))
@pytest.mark.parametrize("size", [1, 5])
def test_m3_cached_equals_uncached(tiny_xlmr_path, xlmr_tokenizer, case, size):
    kwargs = M3_CASES[case]
    model = bge(tiny_xlmr_path, xlmr_tokenizer, unified=kwargs["unified_finetuning"])
    loss = M3Loss(temperature=0.05, **kwargs)
    q, p = features(model)
    batch = batch_of(model, q, p, teacher="kd_loss_type" in kwargs)
    assert_same(uncached(model, loss, batch, q, p), cached(model, loss, batch, q, p, size))


def test_m3_with_dropout_replays_the_masks(tiny_xlmr_path, xlmr_tokenizer):
    model = bge(tiny_xlmr_path, xlmr_tokenizer, dropout=True)
    loss = M3Loss(temperature=0.05, use_self_distill=True)
    q, p = features(model)
    batch = batch_of(model, q, p)
    torch.manual_seed(123)
    expected = chunked_reference(model, loss, batch, q, p, size=3)
    torch.manual_seed(123)
    got = cached(model, loss, batch, q, p, size=3)
    assert_same(expected, got)
    torch.manual_seed(123)
    other = uncached(model, loss, batch, q, p)  # one big forward draws other masks: the check above is not vacuous
    assert not torch.allclose(other[0].loss, got[0].loss)


def test_m3_with_gradient_checkpointing(tiny_xlmr_path, xlmr_tokenizer):
    model = bge(tiny_xlmr_path, xlmr_tokenizer, checkpointing=True)
    loss = M3Loss(temperature=0.05, use_self_distill=True)
    q, p = features(model)
    batch = batch_of(model, q, p)
    assert_same(uncached(model, loss, batch, q, p), cached(model, loss, batch, q, p, size=4))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("matryoshka", [False, True])
def test_qwen3_cached_equals_uncached(tiny_qwen3_path, lora, matryoshka):
    model = qwen(tiny_qwen3_path, lora=lora)
    loss = Qwen3InfoNCELoss(temperature=0.05, false_negative_margin=0.05)
    if matryoshka:
        loss = MatryoshkaLoss(loss, dims=[8, 32], weights=[0.5, 1.0])
    q, p = features(model)
    batch = batch_of(model, q, p)
    expected, got = uncached(model, loss, batch, q, p), cached(model, loss, batch, q, p, size=3)
    assert_same(expected, got)
    assert int(got[0].components["masked_negatives"]) > 0  # the hash rule removed the copied positive
    if lora:
        assert all("lora_" in name for name in got[1])


def test_float32_tolerance(tiny_xlmr_path, xlmr_tokenizer):
    model = bge(tiny_xlmr_path, xlmr_tokenizer).float()
    loss = M3Loss(temperature=0.05, use_self_distill=True)
    q, p = features(model)
    batch = batch_of(model, q, p)
    assert_same(uncached(model, loss, batch, q, p), cached(model, loss, batch, q, p, size=2), tol=1e-5)


# ------------------------------------------------------------------------------------------------ trainers
RECORDS = [
    {"query": QUERIES[i % B] + f" ({i})", "pos": [PASSAGES[(i % B) * G] + f" ({i})"],
     "neg": [PASSAGES[(i % B) * G + 1], PASSAGES[(i % B) * G + 2]]}
    for i in range(8)
]  # fmt: skip


def train_bge(path, tokenizer, tmp_path, name, **fields):
    from ark_hf import BGETrainer, BGETrainerConfig

    model = bge(path, tokenizer).float()
    config = BGETrainerConfig(
        output_dir=str(tmp_path / name), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=4, train_group_size=3, query_max_len=16, passage_max_len=24, max_steps=2,
        logging_steps=1, learning_rate=1e-2, seed=3, use_self_distill=True, gradient_accumulation_steps=2, optim="sgd",
        **fields,
    )  # fmt: skip
    trainer = BGETrainer(model=model, args=config, train_dataset=RECORDS)
    trainer.train()
    return trainer


def test_bge_trainer_with_mini_batches_trains_the_same(tiny_xlmr_path, xlmr_tokenizer, tmp_path):
    """Two steps with gradient accumulation 2, cached and not: the same losses, components and weights. SGD, because
    Adam divides by the gradient's own scale and turns float32 rounding in near-zero rows into visible updates."""
    plain = train_bge(tiny_xlmr_path, xlmr_tokenizer, tmp_path, "plain")
    cached_run = train_bge(tiny_xlmr_path, xlmr_tokenizer, tmp_path, "cached", mini_batch_size=5)
    assert cached_run.grad_cache is not None and plain.grad_cache is None
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (plain, cached_run)]
    for a, b in zip(*logs):
        for key in ("loss", "loss_dense", "loss_lex", "loss_mul", "loss_self_distill", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(plain.model.named_parameters(), cached_run.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "fields, message",
    [(dict(mini_batch_size=0), "mini_batch_size must be >= 1"), (dict(mini_batch_size=13), "larger than the batch")],
)
def test_bad_mini_batch_size_is_refused(tmp_path, fields, message):
    from ark_hf import BGETrainerConfig

    with pytest.raises(ValueError, match=message):
        BGETrainerConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, train_group_size=3, **fields)
