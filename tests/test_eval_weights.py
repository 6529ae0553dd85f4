"""`search_mode_weights`: the dev-split search of the M3 ensemble weights, against a float64 re-derivation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ark_hf.evaluation.weights import search_mode_weights


def ndcg10(scores: np.ndarray, relevant: list[set[int]]) -> float:
    """Binary-relevance nDCG@10 averaged over queries, written out in float64 (ties broken by document index)."""
    total = 0.0
    for row, rel in zip(scores, relevant):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:10]
        dcg = sum(1.0 / math.log2(rank + 2) for rank, j in enumerate(order) if j in rel)
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(rel), 10)))
        total += dcg / ideal
    return total / len(relevant)


def planted(seed: int = 0, queries: int = 30, docs: int = 60):
    """Dense is noise, ColBERT knows the answer well, sparse a little."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, docs, size=queries)
    signal = np.zeros((queries, docs))
    signal[np.arange(queries), gold] = 1.0
    dense = rng.normal(size=(queries, docs))
    sparse = 0.6 * signal + rng.normal(size=(queries, docs))
    colbert = 1.5 * signal + rng.normal(size=(queries, docs))
    qids = [f"q{i}" for i in range(queries)]
    dids = [f"d{j}" for j in range(docs)]
    qrels = {q: {dids[g]: 1} for q, g in zip(qids, gold)}
    mats = {"dense": torch.tensor(dense), "sparse": torch.tensor(sparse), "colbert": torch.tensor(colbert)}
    return mats, qrels, qids, dids, [{int(g)} for g in gold]


def test_search_finds_the_best_triple_of_the_grid():
    mats, qrels, qids, dids, relevant = planted()
    grid = (0.0, 0.5, 1.0)
    result = search_mode_weights(mats, qrels, qids, dids, grid=grid, prefer=None)
    # independent brute force over the same grid, in float64
    dense, sparse, colbert = (mats[k].numpy() for k in ("dense", "sparse", "colbert"))
    expected = {}
    for w in itertools.product(grid, repeat=3):
        if max(w) == 0:
            continue
        key = tuple(x / max(w) for x in w)
        expected[key] = ndcg10(w[0] * dense + w[1] * sparse + w[2] * colbert, relevant)
    best_value = max(expected.values())
    assert result.score == pytest.approx(best_value, abs=1e-9)
    assert expected[result.weights] == pytest.approx(best_value, abs=1e-9)
    # every candidate's reported value matches the re-derivation, and scale-equivalent triples are tried once
    assert len(result.table) == len(expected)
    for weights, value in result.table:
        assert value == pytest.approx(expected[weights], abs=1e-9)
    # the planted signal: ColBERT carries the weight, noisy dense gets less than ColBERT
    assert result.weights[2] == 1.0 and result.weights[0] < 1.0
    assert result.score > ndcg10(dense + 0.3 * sparse + colbert, relevant)


def test_prefer_wins_ties_and_is_tried_first():
    mats, qrels, qids, dids, _ = planted()
    same = {k: mats["colbert"].clone() for k in ("dense", "sparse", "colbert")}  # every triple ranks identically
    result = search_mode_weights(same, qrels, qids, dids, grid=(0.0, 1.0), prefer=(1.0, 0.3, 1.0))
    assert result.table[0][0] == (1.0, 0.3, 1.0)
    assert result.weights == (1.0, 0.3, 1.0)


def test_bad_input_is_named():
    mats, qrels, qids, dids, _ = planted()
    with pytest.raises(ValueError, match="missing \\['colbert'\\]"):
        search_mode_weights({"dense": mats["dense"], "sparse": mats["sparse"]}, qrels, qids, dids)
    reranked = dict(mats, colbert=mats["colbert"].clone())
    reranked["colbert"][0, 0] = float("-inf")
    with pytest.raises(ValueError, match="non-finite"):
        search_mode_weights(reranked, qrels, qids, dids)
    with pytest.raises(ValueError, match="shape"):
        search_mode_weights(dict(mats, sparse=mats["sparse"][:, :5]), qrels, qids, dids)
    with pytest.raises(ValueError, match="unknown metric"):
        search_mode_weights(mats, qrels, qids, dids, metric="p@5")
    with pytest.raises(ValueError, match="non-negative"):
        search_mode_weights(mats, qrels, qids, dids, grid=(-1.0, 1.0))
