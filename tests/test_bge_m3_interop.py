"""A folder saved by `BGEM3Model.save_pretrained` works in FlagEmbedding and sentence-transformers, unchanged.

The model is the tiny XLM-R (BGE-M3's architecture at test size, the real 250,002-id tokenizer) with heads
initialised and then moved by one optimizer step, so that every head differs from any fresh initialisation.
FlagEmbedding's `BGEM3FlagModel` and `SentenceTransformer` load the folder; their dense vectors, lexical
weights, ColBERT vectors and `compute_score` modes must equal ark_hf's own `encode` / `compute_score`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ark_hf.losses.m3 import M3Loss
from ark_hf.models.bge_m3 import COLBERT_FILE, SPARSE_FILE, BGEM3Model, MissingHeadsError

pytestmark = pytest.mark.slow  # end-to-end runs (real training, saved folders loaded by other tools)

flag_embedding = pytest.importorskip("FlagEmbedding")
fe_modeling = pytest.importorskip("FlagEmbedding.finetune.embedder.encoder_only.m3.modeling")
fe_runner = pytest.importorskip("FlagEmbedding.finetune.embedder.encoder_only.m3.runner")

TEXTS = [
    "how do I renew a building permit",
    "A building permit can be renewed online before it expires, for a small fee.",
    "hi",
    "permit permit permit: the same token three times",  # repeated ids: lexical weight is the max
    "Bygglov förnyas på nätet innan det går ut.",  # Swedish: non-English pieces of the real vocabulary
]
PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3]), (TEXTS[0], TEXTS[4]), (TEXTS[3], TEXTS[1])]
ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(tiny_xlmr_path, tmp_path_factory):
    """(model after one training step, its saved folder)."""
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    with torch.no_grad():  # a random sparse head may clip every token to 0; start with most weights positive
        model.sparse_linear.bias.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    query = model.tokenize(TEXTS[:2], 16)
    passages = model.tokenize(TEXTS[1:5], 16)
    out = model(query=query, passages=passages)
    loss, _ = M3Loss(use_self_distill=True)(out.query, out.passages, 2)
    loss.backward()
    optimizer.step()
    model.eval()
    for name in ("colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"):
        assert not torch.equal(model.state_dict()[name], before[name]), f"{name} did not move"
    folder = tmp_path_factory.mktemp("m3_interop") / "saved"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def reloaded(trained):
    return BGEM3Model.from_pretrained(str(trained[1])).eval()


@pytest.fixture(scope="module")
def flag_model(trained):
    return flag_embedding.BGEM3FlagModel(str(trained[1]), use_fp16=False, devices="cpu")


def _ours(model: BGEM3Model, texts, **kwargs):
    return model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, **kwargs)


def _assert_same_outputs(theirs: dict, ours: dict) -> None:
    np.testing.assert_allclose(theirs["dense_vecs"], ours["dense_vecs"], rtol=0, atol=ATOL)
    assert len(theirs["lexical_weights"]) == len(ours["lexical_weights"]) == len(TEXTS)
    for fe_weights, our_weights in zip(theirs["lexical_weights"], ours["lexical_weights"]):
        assert our_weights, "no positive lexical weight: the comparison would be vacuous"
        assert set(fe_weights) == set(our_weights)
        for token, weight in fe_weights.items():
            assert our_weights[token] == pytest.approx(float(weight), abs=ATOL), token
    assert len(theirs["colbert_vecs"]) == len(ours["colbert_vecs"])
    for fe_vecs, our_vecs in zip(theirs["colbert_vecs"], ours["colbert_vecs"]):
        assert fe_vecs.shape == our_vecs.shape
        np.testing.assert_allclose(fe_vecs, our_vecs, rtol=0, atol=ATOL)


def test_saved_folder_layout(trained):
    _, folder = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", COLBERT_FILE, SPARSE_FILE, "m3_heads.json"):
        assert (folder / name).is_file(), name
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (folder / name).is_file(), name


def test_from_pretrained_restores_every_weight_exactly(trained, reloaded):
    model, _ = trained
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert set(saved) == set(loaded)
    for name, value in saved.items():
        assert torch.equal(value, loaded[name]), name
    assert reloaded.has_heads and reloaded.heads_trained
    assert reloaded.colbert_linear.out_features == model.config.hidden_size


def test_flagembedding_encode_matches_ours(trained, reloaded, flag_model):
    model, _ = trained
    ours = _ours(reloaded, TEXTS)
    _assert_same_outputs(
        flag_model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True), ours
    )
    # the reloaded model is the trained one
    _assert_same_outputs(ours, _ours(model, TEXTS))
    # the repeated token keeps its largest weight, once
    ids = reloaded.tokenizer(TEXTS[3])["input_ids"]
    assert len(ours["lexical_weights"][3]) < len(ids) - 2


def test_flagembedding_encode_with_truncation_and_query_lengths(reloaded, flag_model):
    short = flag_model.encode(TEXTS, max_length=6, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ours = _ours(reloaded, TEXTS, max_length=6)
    _assert_same_outputs(short, ours)
    assert max(len(v) for v in ours["colbert_vecs"]) == 5  # 6 tokens minus CLS
    queries = flag_model.encode_queries(
        TEXTS, max_length=8, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    _assert_same_outputs(queries, _ours(reloaded, TEXTS, max_length=8))


def test_sentence_transformers_dense_matches_ours(trained, reloaded):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(trained[1]), device="cpu")
    dense = st.encode(TEXTS, convert_to_numpy=True, batch_size=2)
    np.testing.assert_allclose(dense, reloaded.encode(TEXTS)["dense_vecs"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.4, 0.2, 0.4)], ids=["uniform", "readme"])
def test_compute_score_matches_flagembedding(reloaded, flag_model, weights):
    # one pair per FlagEmbedding batch: no passage padding, whose zero vectors would join ColBERT's max there
    theirs = flag_model.compute_score(PAIRS, batch_size=1, weights_for_different_modes=list(weights))
    ours = reloaded.compute_score(PAIRS, weights=weights)
    assert set(ours) == set(theirs) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    for mode in theirs:
        np.testing.assert_allclose(ours[mode], theirs[mode], rtol=0, atol=ATOL, err_msg=mode)
    assert min(ours["sparse"]) >= 0 and max(ours["sparse"]) > 0


def test_compute_score_modes_from_encode(reloaded):
    ours = reloaded.compute_score(PAIRS)  # default weights: the training ensemble's (1, 0.3, 1)
    q = _ours(reloaded, [a for a, _ in PAIRS])
    p = _ours(reloaded, [b for _, b in PAIRS])
    for i in range(len(PAIRS)):
        dense = float(q["dense_vecs"][i] @ p["dense_vecs"][i])
        shared = set(q["lexical_weights"][i]) & set(p["lexical_weights"][i])
        sparse = sum(q["lexical_weights"][i][t] * p["lexical_weights"][i][t] for t in shared)
        colbert = float((q["colbert_vecs"][i] @ p["colbert_vecs"][i].T).max(axis=1).mean())
        assert ours["dense"][i] == pytest.approx(dense, abs=1e-6)
        assert ours["sparse"][i] == pytest.approx(sparse, abs=1e-6)
        assert ours["colbert"][i] == pytest.approx(colbert, abs=1e-6)
        assert ours["sparse+dense"][i] == pytest.approx((dense + 0.3 * sparse) / 1.3, abs=1e-6)
        assert ours["colbert+sparse+dense"][i] == pytest.approx((dense + 0.3 * sparse + colbert) / 2.3, abs=1e-6)


def test_folder_saved_by_flagembedding_loads_with_its_heads(trained, tmp_path):
    """The reverse direction: FlagEmbedding's own `save` (backbone + .pt heads, no extra files)."""
    model, folder = trained
    base = fe_runner.EncoderOnlyEmbedderM3Runner.get_model(str(folder))
    fe = fe_modeling.EncoderOnlyEmbedderM3Model(base, tokenizer=model.tokenizer, unified_finetuning=True)
    fe.save(str(tmp_path / "fe"))
    model.tokenizer.save_pretrained(tmp_path / "fe")
    loaded = BGEM3Model.from_pretrained(str(tmp_path / "fe"))
    assert loaded.heads_trained  # released BGE-M3 folders carry trained heads and no m3_heads.json
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_missing_heads(tiny_xlmr_path, trained, tmp_path):
    tokenizer = trained[0].tokenizer
    with pytest.raises(MissingHeadsError, match="colbert_linear.pt, sparse_linear.pt"):
        BGEM3Model(tiny_xlmr_path, unified_finetuning=True, tokenizer=tokenizer)
    fresh = BGEM3Model(tiny_xlmr_path, unified_finetuning=True, init_missing_heads=True, tokenizer=tokenizer)
    assert fresh.has_heads and not fresh.heads_trained
    dense_only = BGEM3Model(tiny_xlmr_path, unified_finetuning=False, tokenizer=tokenizer)
    assert not dense_only.has_heads
    assert dense_only.encode(TEXTS[:2])["dense_vecs"].shape == (2, dense_only.config.hidden_size)
    with pytest.raises(MissingHeadsError):
        dense_only.encode(TEXTS[:2], return_sparse=True)
    # one head file missing: named in the error, never replaced silently
    partial = tmp_path / "partial"
    shutil.copytree(trained[1], partial)
    (partial / SPARSE_FILE).unlink()
    with pytest.raises(MissingHeadsError, match=SPARSE_FILE):
        BGEM3Model.from_pretrained(str(partial), tokenizer=tokenizer)
    dense_only = BGEM3Model.from_pretrained(str(partial), unified_finetuning=False, tokenizer=tokenizer)
    with pytest.raises(MissingHeadsError):
        dense_only.encode(TEXTS[:1], return_colbert_vecs=True)
