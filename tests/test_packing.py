"""Padding-free (packed) forward: same outputs, losses and gradients as the padded forward, on CPU."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ark_hf.losses.infonce import contrastive_loss
from ark_hf.losses.m3 import M3Loss
from ark_hf.models import packing
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder
from ark_hf.models.packing import PackedBatch, enable_padding_free, packed_hidden_states

TOL = 1e-5
QUERIES = ["what is a building permit", "wie lange dauert die Genehmigung", "roof", "who signs the form?"]
PASSAGES = [
    "A building permit is an official approval to build, alter or demolish a structure on a plot of land.",
    "Permits",
    "Die Genehmigung dauert in der Regel zwischen vier und zwölf Wochen, je nach Gemeinde und Vorhaben.",
    "The neighbour's consent is not needed for a flat roof below three metres.",
    "Le permis de construire est délivré par la mairie.",
    "x",
    "The owner signs the application form; an architect countersigns the drawings and the structural report.",
    "Signed forms go to the planning office.",
]
GROUP = 2
MAX_LEN = 20  # several passages are longer: truncation is part of every test


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def m3(tiny_xlmr_path):
    model = _no_dropout(BGEM3Model(tiny_xlmr_path, init_missing_heads=True))
    with torch.no_grad():  # a random sparse head can clip every token to 0 (no gradient); most tokens positive
        model.sparse_linear.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def qwen(tiny_qwen3_path):
    return _no_dropout(DecoderEmbedder(tiny_qwen3_path))


def _tokenize(model, texts, side, max_length=MAX_LEN):
    tokenizer = model.tokenizer
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        return model.tokenize(texts, max_length)
    finally:
        tokenizer.padding_side = previous


@contextlib.contextmanager
def _switch(model, padding_free):
    """`padding_free` on for a forward *and* its backward (a checkpointed backward re-runs attention)."""
    model.padding_free = padding_free
    try:
        yield
    finally:
        model.padding_free = False


def _encode(model, features, padding_free):
    with _switch(model, padding_free):
        return model.encode_features(features)


def _loss_and_grads(model, loss_fn, queries, passages, padding_free):
    model.zero_grad()
    with _switch(model, padding_free):
        out = model(query=queries, passages=passages)  # padding-free: one backbone call for both
        loss = loss_fn(out.query, out.passages)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def _m3_loss(query, passages):
    return M3Loss(use_self_distill=True)(query, passages, GROUP, step=1)[0]


def _qwen_loss(query, passages):
    return contrastive_loss(query.dense @ passages.dense.T / 0.05, GROUP)


def _assert_close(a, b, what):
    assert a.shape == b.shape, what
    assert torch.allclose(a.float(), b.float(), atol=TOL, rtol=TOL), f"{what}: {(a.float() - b.float()).abs().max()}"


def test_batches_are_truncated_and_padded(m3, qwen):
    for model in (m3, qwen):
        mask = _tokenize(model, PASSAGES, "right")["attention_mask"]
        lengths = mask.sum(1)
        assert int(lengths.max()) == MAX_LEN and int(lengths.min()) < MAX_LEN // 2


# --------------------------------------------------------------------------------------------- BGE-M3
@pytest.mark.parametrize("side", ["right", "left"])
def test_m3_packed_equals_padded(m3, side):
    m3.eval()
    features = _tokenize(m3, PASSAGES, side)
    padded, packed = _encode(m3, features, False), _encode(m3, features, True)
    for field in ("dense", "sparse_weights", "input_ids", "colbert", "colbert_mask"):
        _assert_close(padded[field], packed[field], field)
    assert packed.colbert_mask.sum() == features["attention_mask"].sum() - len(PASSAGES)  # CLS skipped


def test_m3_padding_side_and_packing_equal_each_text_alone(m3):
    """Independent reference: every text encoded on its own (batch of one, no padding at all)."""
    m3.eval()
    alone = [m3.encode_features(_tokenize(m3, [text], "right")) for text in PASSAGES]
    for side in ("right", "left"):
        features = _tokenize(m3, PASSAGES, side)
        for padding_free in (False, True):
            out = _encode(m3, features, padding_free)
            mask = features["attention_mask"].bool()
            for i, ref in enumerate(alone):
                _assert_close(out.dense[i], ref.dense[0], f"dense {side} {padding_free} {i}")
                _assert_close(out.sparse_weights[i][mask[i]], ref.sparse_weights[0], f"sparse {side} {i}")
                colbert = out.colbert[i][out.colbert_mask[i].bool()]
                _assert_close(colbert, ref.colbert[0], f"colbert {side} {padding_free} {i}")


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_m3_other_poolings(tiny_xlmr_path, pooling):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True, pooling=pooling).eval()
    for side in ("right", "left"):
        features = _tokenize(model, PASSAGES, side)
        _assert_close(_encode(model, features, False).dense, _encode(model, features, True).dense, pooling)


@pytest.mark.parametrize("side", ["right", "left"])
def test_m3_loss_and_gradients_equal(m3, side):
    m3.train()
    queries, passages = _tokenize(m3, QUERIES, side), _tokenize(m3, PASSAGES, side)
    losses, grads = zip(*(_loss_and_grads(m3, _m3_loss, queries, passages, on) for on in (False, True)))
    _assert_close(losses[0], losses[1], "M3 loss")
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        _assert_close(grads[0][name], grads[1][name], name)
    assert grads[0]["colbert_linear.weight"].abs().sum() > 0 and grads[0]["sparse_linear.weight"].abs().sum() > 0


def test_m3_packed_gradients_with_activation_checkpointing(m3):
    """The checkpointed recompute in backward must see the text boundaries again."""
    model = m3.train()
    queries, passages = _tokenize(model, QUERIES, "right"), _tokenize(model, PASSAGES, "right")
    _, padded = _loss_and_grads(model, _m3_loss, queries, passages, False)
    model.activation_checkpointing_enable()
    try:
        _, packed = _loss_and_grads(model, _m3_loss, queries, passages, True)
    finally:
        model.gradient_checkpointing_disable()
    grads = (padded, packed)
    for name in grads[0]:
        _assert_close(grads[0][name], grads[1][name], name)


@pytest.mark.parametrize("name", ["m3", "qwen"])
def test_queries_and_passages_share_one_packed_backbone_call(request, name):
    """A padding-free training forward runs the backbone once for queries and passages together; every output
    equals the padded forward's and the separate packed calls' (the loss and gradient tests above compare the
    joint call's gradients with the padded path's)."""
    model = request.getfixturevalue(name).eval()
    queries, passages = _tokenize(model, QUERIES, "left"), _tokenize(model, PASSAGES, "right")
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        padded = model(query=queries, passages=passages)
        padded_calls = len(calls)
        with _switch(model, True):
            joint = model(query=queries, passages=passages)
            joint_calls = len(calls) - padded_calls
            separate = (model.encode_features(queries), model.encode_features(passages))
    finally:
        hook.remove()
    assert (padded_calls, joint_calls) == (2, 1)
    fields = ("dense", "sparse_weights", "colbert", "colbert_mask") if name == "m3" else ("dense",)
    for side, ref, alone in (("query", padded.query, separate[0]), ("passages", padded.passages, separate[1])):
        for field in fields:
            _assert_close(getattr(joint, side)[field], ref[field], f"{side} {field} vs padded")
            _assert_close(getattr(joint, side)[field], alone[field], f"{side} {field} vs its own packed call")


# --------------------------------------------------------------------------------------------- Qwen3
@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen_packed_equals_padded_and_each_text_alone(qwen, side):
    qwen.eval()
    features = _tokenize(qwen, PASSAGES, side)
    padded, packed = _encode(qwen, features, False), _encode(qwen, features, True)
    _assert_close(padded.dense, packed.dense, "dense")
    for i, text in enumerate(PASSAGES):
        alone = qwen.encode_features(_tokenize(qwen, [text], side)).dense[0]
        _assert_close(packed.dense[i], alone, f"text {i}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen_loss_and_gradients_equal(tiny_qwen3_path, side):
    # float64: the two paths sum in different orders, and float32 rounding (1e-5 on some gradients of the
    # random model) would hide a real difference as well as it makes a false one
    qwen = _no_dropout(DecoderEmbedder(tiny_qwen3_path)).double().train()
    queries, passages = _tokenize(qwen, QUERIES, side), _tokenize(qwen, PASSAGES, side)
    losses, grads = zip(*(_loss_and_grads(qwen, _qwen_loss, queries, passages, on) for on in (False, True)))
    _assert_close(losses[0], losses[1], "loss")
    assert len(grads[0]) > 10
    for name in grads[0]:
        _assert_close(grads[0][name], grads[1][name], name)


@pytest.mark.parametrize("kwargs", [{"lora": True}, {"attn_implementation": "eager"}])
def test_qwen_lora_and_eager_backbones(tiny_qwen3_path, kwargs):
    model = DecoderEmbedder(tiny_qwen3_path, **kwargs).eval()
    features = _tokenize(model, PASSAGES, "left")
    mask = features["attention_mask"].bool()
    padded = model.encode_features(features).dense
    before = model.model(**features, use_cache=False).last_hidden_state[mask]
    model.padding_free = True
    assert model.backbone.config._attn_implementation == packing.PACKED_ATTENTION_PREFIX + (
        kwargs.get("attn_implementation") or "sdpa"
    )
    # a padded call of the switched backbone still runs the original implementation with its mask
    after = model.model(**features, use_cache=False).last_hidden_state[mask]
    packed = model.encode_features(features).dense
    model.padding_free = False
    assert model.backbone.config._attn_implementation == (kwargs.get("attn_implementation") or "sdpa")
    _assert_close(before, after, "padded call after the switch")
    _assert_close(padded, packed, "packed")


# ------------------------------------------------------------------------------- boundaries, kernel, errors
def test_packing_without_boundaries_differs(m3, qwen):
    """The equality tests can fail: one segment over all texts (cross-text attention) changes the outputs."""
    for model, offset in ((m3.eval(), m3.config.pad_token_id + 1), (qwen.eval(), 0)):
        features = _tokenize(model, PASSAGES, "right")
        packed = PackedBatch.from_padded(features["input_ids"], features["attention_mask"], offset=offset)
        total = packed.input_ids.shape[1]
        merged = PackedBatch(
            **{**packed.__dict__, "cu_seqlens": torch.tensor([0, total], dtype=torch.int32), "max_length": total}
        )
        model.padding_free = True
        try:
            right = packed_hidden_states(model.model, packed, **({} if offset else {"use_cache": False}))
            wrong = packed_hidden_states(model.model, merged, **({} if offset else {"use_cache": False}))
        finally:
            model.padding_free = False
        assert (right - wrong).abs().max() > 1e-3


def test_packed_batch_layout():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [1, 1, 1, 0, 7, 2], [0, 8, 9, 3, 4, 2]])
    mask = (ids != 1).long()
    packed = PackedBatch.from_padded(ids, mask, offset=2)
    assert packed.input_ids.tolist() == [[0, 5, 6, 2, 0, 7, 2, 0, 8, 9, 3, 4, 2]]
    assert packed.position_ids.tolist() == [[2, 3, 4, 5, 2, 3, 4, 2, 3, 4, 5, 6, 7]]
    assert packed.cu_seqlens.tolist() == [0, 4, 7, 13] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_length == 6 and packed.last_index.tolist() == [3, 6, 12]
    assert torch.equal(packed.repad(packed.input_ids[0]), ids * mask)


def test_bad_masks_are_refused():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"padding_free: texts \[1\].*non-contiguous"):
        PackedBatch.from_padded(ids, torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]]))
    with pytest.raises(ValueError, match=r"texts \[0\] have an empty"):
        PackedBatch.from_padded(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_padding_free(nn.Linear(2, 2))


def test_packed_forward_needs_the_switch(m3):
    features = _tokenize(m3, PASSAGES, "right")
    packed = PackedBatch.from_padded(features["input_ids"], features["attention_mask"])
    with pytest.raises(RuntimeError, match="enable_padding_free"):
        packed_hidden_states(m3.model, packed)


def test_missing_kernel_warns_once_naming_the_switch(m3, caplog, monkeypatch):
    monkeypatch.setattr(packing, "_varlen_attn", None)
    packing._WARNED.clear()
    features = _tokenize(m3.eval(), PASSAGES, "right")
    with caplog.at_level(logging.WARNING, logger="ark_hf.models.packing"):
        first = _encode(m3, features, True)
        second = _encode(m3, features, True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.packing"]
    assert len(warnings) == 1, warnings
    assert "padding_free=True" in warnings[0] and "varlen_attn" in warnings[0] and "falls back" in warnings[0]
    _assert_close(first.dense, _encode(m3, features, False).dense, "fallback dense")
    _assert_close(first.dense, second.dense, "repeat")


def _reference_varlen(calls):
    """float64 per-text softmax attention with varlen_attn's calling convention ([T, H, d], int32 cu_seqlens)."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert cu_q.dtype == torch.int32 and isinstance(max_q, int) and torch.equal(cu_q, cu_k) and max_q == max_k
        assert q.shape[1] == k.shape[1] == v.shape[1], "the wrapper repeats kv heads when enable_gqa is missing"
        calls.append(window_size)
        out = torch.empty_like(q, dtype=torch.float64)
        bounds = cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (x[start:end].double().transpose(0, 1) for x in (q, k, v))  # [H, l, d]
            scores = qs @ ks.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
            if window_size == (-1, 0):
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            else:
                assert window_size == (-1, -1)
            out[start:end] = (scores.softmax(-1) @ vs).transpose(0, 1)
        return out.to(q.dtype)

    return varlen_attn


def test_varlen_kernel_path_with_reference_kernel(m3, qwen, monkeypatch):
    """The kernel branch (argument layout, causal window, GQA) against a float64 reference kernel."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(packing, "_varlen_attn", _reference_varlen(calls))
    monkeypatch.setattr(packing, "_varlen_unusable", lambda q, k, v: None)
    monkeypatch.setattr(packing, "_VARLEN_HAS_GQA", False)
    for model, side, window in ((m3.eval(), "right", (-1, -1)), (qwen.eval(), "left", (-1, 0))):
        features = _tokenize(model, PASSAGES, side)
        calls.clear()
        _assert_close(_encode(model, features, True).dense, _encode(model, features, False).dense, side)
        assert calls == [window] * model.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.skipif(not packing.varlen_attention_available(), reason="needs CUDA and torch's varlen_attn")
def test_varlen_kernel_on_cuda_bf16(tiny_xlmr_path, tiny_qwen3_path):
    for model in (
        BGEM3Model(tiny_xlmr_path, init_missing_heads=True).cuda().eval(),
        DecoderEmbedder(tiny_qwen3_path).cuda().eval(),
    ):
        features = {k: v.cuda() for k, v in _tokenize(model, PASSAGES, "right").items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            padded, packed = _encode(model, features, False), _encode(model, features, True)
        assert F.cosine_similarity(padded.dense.float(), packed.dense.float()).min() > 0.999
