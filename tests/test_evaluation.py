"""The IR evaluator's figures equal ir-measures run directly on a run file built in the test."""

from __future__ import annotations

import hashlib

import ir_measures
import numpy as np
import pytest
import torch

from ark_hf.evaluation.ir import IREvaluator, compute_metrics
from ark_hf.models.outputs import EmbeddingOutput

WORDS = "permit roof window garage tree fence wall heat solar pump drain stair door floor paint brick".split()


def bag_vector(text: str, dim: int = 16) -> np.ndarray:
    vec = np.zeros(dim)
    for word in text.lower().split():
        vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return vec / max(np.linalg.norm(vec), 1e-9)


class BagOfWordsModel(torch.nn.Module):
    """A deterministic stand-in embedder: hashed bag of words (the evaluator only needs these two methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.texts: list[str] = []

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        start = len(self.texts)
        self.texts.extend(texts)
        return {"input_ids": torch.arange(start, start + len(texts)).unsqueeze(1)}

    def encode_features(self, features: dict[str, torch.Tensor]) -> EmbeddingOutput:
        rows = [bag_vector(self.texts[i]) for i in features["input_ids"][:, 0].tolist()]
        return EmbeddingOutput(dense=torch.tensor(np.stack(rows), dtype=torch.float32))


@pytest.fixture
def ir_set():
    rng = np.random.default_rng(0)
    corpus = {f"d{i}": " ".join(rng.choice(WORDS, size=6)) for i in range(40)}
    queries, qrels = {}, {}
    for i in range(12):
        relevant = [f"d{j}" for j in rng.choice(40, size=1 + i % 3, replace=False)]
        queries[f"q{i}"] = " ".join(corpus[relevant[0]].split()[:3])
        qrels[f"q{i}"] = {d: 1 for d in relevant}
    return queries, corpus, qrels


def test_evaluator_equals_ir_measures_on_a_run_file(ir_set, tmp_path):
    queries, corpus, qrels = ir_set
    metrics = IREvaluator(queries, corpus, qrels, top_k=100, batch_size=5)(BagOfWordsModel())

    # independent: scores by numpy, a TREC run file on disk, ir-measures reading it back
    lines = []
    for qid, query in queries.items():
        q = bag_vector(query)
        scored = sorted(((float(q @ bag_vector(text)), did) for did, text in corpus.items()), reverse=True)
        lines += [f"{qid} Q0 {did} {rank} {score:.9f} test" for rank, (score, did) in enumerate(scored[:100], 1)]
    run_file = tmp_path / "run.trec"
    run_file.write_text("\n".join(lines) + "\n")
    qrels_rows = [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
    expected = ir_measures.calc_aggregate(
        [ir_measures.nDCG @ 10, ir_measures.RR @ 10, ir_measures.R @ 10, ir_measures.R @ 100, ir_measures.AP],
        qrels_rows,
        list(ir_measures.read_trec_run(str(run_file))),
    )
    assert metrics["dense_ndcg@10"] == pytest.approx(expected[ir_measures.nDCG @ 10], abs=1e-6)
    assert metrics["dense_mrr@10"] == pytest.approx(expected[ir_measures.RR @ 10], abs=1e-6)
    assert metrics["dense_recall@10"] == pytest.approx(expected[ir_measures.R @ 10], abs=1e-6)
    assert metrics["dense_recall@100"] == pytest.approx(expected[ir_measures.R @ 100], abs=1e-6)
    assert metrics["dense_map"] == pytest.approx(expected[ir_measures.AP], abs=1e-6)
    assert 0 < metrics["dense_ndcg@10"] < 1


def test_hand_computed_metrics():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0, "y": 1.0}, "q2": {"b": 3.0, "z": 2.0, "c": 1.0}}
    metrics = compute_metrics(qrels, run)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    ndcg_q1 = (1 / np.log2(3)) / 1.0
    ndcg_q2 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert metrics["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert metrics["map"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)


def test_evaluator_names_and_modes(ir_set):
    queries, corpus, qrels = ir_set
    metrics = IREvaluator(queries, corpus, qrels, name="faq")(BagOfWordsModel())
    assert set(metrics) == {f"faq_dense_{m}" for m in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map")}
    with pytest.raises(ValueError, match="unknown evaluation modes"):
        IREvaluator(queries, corpus, qrels, modes=["bm25"])
    with pytest.raises(ValueError, match="no query"):
        IREvaluator(queries, corpus, {"other": {"d1": 1}})


def test_colbert_rerank_scores_only_the_first_stage_candidates(tiny_xlmr_path):
    from ark_hf import BGEM3Model

    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(1.0)  # a random sparse head may clip every weight to 0
    words = WORDS
    corpus = {f"d{i}": " ".join(words[(i + k) % len(words)] for k in range(5)) for i in range(12)}
    queries = {f"q{i}": " ".join(words[(2 * i + k) % len(words)] for k in range(2)) for i in range(5)}
    qrels = {f"q{i}": {f"d{2 * i}": 1} for i in range(5)}
    modes = ["dense", "sparse", "colbert", "dense+sparse", "all"]
    exact = IREvaluator(queries, corpus, qrels, modes=modes, query_max_len=16, passage_max_len=16)
    reranked = IREvaluator(queries, corpus, qrels, modes=modes, query_max_len=16, passage_max_len=16, rerank_top_k=3)
    full, cut = exact.score_matrices(model), reranked.score_matrices(model)
    candidates = full["dense+sparse"].topk(3, dim=1).indices
    for qi in range(5):
        kept = set(candidates[qi].tolist())
        for di in range(12):
            if di in kept:
                assert cut["colbert"][qi, di] == pytest.approx(float(full["colbert"][qi, di]), abs=1e-6)
                assert cut["all"][qi, di] == pytest.approx(float(full["all"][qi, di]), abs=1e-6)
            else:
                assert cut["colbert"][qi, di] == float("-inf")
    assert torch.equal(cut["dense"], full["dense"]) and torch.equal(cut["sparse"], full["sparse"])
    run = reranked._run(cut["colbert"])
    assert all(len(docs) == 3 for docs in run.values())  # -inf documents never enter the run
    assert IREvaluator(queries, corpus, qrels, modes=modes, rerank_top_k=100)(model) == exact(model)
