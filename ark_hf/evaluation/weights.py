"""Choose BGE-M3's ensemble weights (`eval_mode_weights`) on a dev split instead of fixing them.

The `all` mode scores a (query, passage) pair as `s = w_d s_dense + w_s s_sparse + w_c s_colbert`. BGE-M3's
weights (1, 0.3, 1) suit its released heads; heads that start fresh and train briefly are often much weaker than
the dense head, and fixed weights then pull the ensemble below the dense head alone. `search_mode_weights` tries
every weight triple of a grid on dev data and keeps the one with the best metric:

```python
from ark_hf.evaluation.ir import IREvaluator
from ark_hf.evaluation.weights import search_mode_weights

dev = IREvaluator(dev_queries, corpus, dev_qrels, modes=("dense", "sparse", "colbert"))
best = search_mode_weights(dev.score_matrices(model), dev.qrels, dev.query_ids, dev.doc_ids)
config.eval_mode_weights = list(best.weights)  # or IREvaluator(..., weights=best.weights) on the test set
```

Only the ranking matters, so triples that are multiples of each other are one candidate; the grid's triples are
reduced to `w / max(w)` and deduplicated. Ties keep the first candidate in the order: the `prefer` triple (BGE-M3's
weights by default), then the grid in lexicographic order of (dense, sparse, colbert).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ark_hf.evaluation.ir import METRICS, compute_metrics
from ark_hf.models.outputs import M3_HEADS

__all__ = ["DEFAULT_GRID", "WeightSearchResult", "search_mode_weights"]

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


@dataclass
class WeightSearchResult:
    """What `search_mode_weights` found.

    Attributes:
        weights: the best (dense, sparse, colbert) weights, scaled so the largest is 1.
        score: their `metric` on the dev data.
        metric: the metric that was maximised.
        table: every candidate tried and its score, in the order tried.
    """

    weights: tuple[float, float, float]
    score: float
    metric: str
    table: list[tuple[tuple[float, float, float], float]] = field(default_factory=list)


def _normalized(weights: Sequence[float]) -> tuple[float, float, float]:
    top = max(weights)
    return tuple(round(w / top, 6) for w in weights)  # type: ignore[return-value]


def search_mode_weights(
    scores: Mapping[str, torch.Tensor],
    qrels: Mapping[str, Mapping[str, int]],
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "ndcg@10",
    top_k: int = 100,
    prefer: tuple[float, float, float] | None = (1.0, 0.3, 1.0),
) -> WeightSearchResult:
    """Grid-search the (dense, sparse, colbert) weights of the `all` mode on dev data.

    For each candidate `w` the combined matrix `S = w_d D + w_s L + w_c C` ranks the documents of every query (its
    top `top_k` form the run) and `metric` is computed with ir-measures against `qrels`.

    Args:
        scores: `[num_queries, num_docs]` matrices under the keys `dense`, `sparse` and `colbert` (what
            `IREvaluator(..., modes=("dense", "sparse", "colbert")).score_matrices(model)` returns, scored on every
            document: a re-ranked ColBERT matrix holds -inf outside the candidates and cannot be searched).
        qrels: `qid -> {doc_id: relevance}`.
        query_ids, doc_ids: the row and column ids of the matrices.
        grid: weight values tried for each head (non-negative; triples that are all 0 are skipped).
        metric: one of `ir.METRICS`.
        top_k: documents kept per query in each run.
        prefer: a triple tried first, so it wins ties (None: none).

    Returns:
        A `WeightSearchResult`.

    Example:
        >>> best = search_mode_weights(dev.score_matrices(model), dev.qrels, dev.query_ids, dev.doc_ids)  # doctest: +SKIP
        >>> best.weights  # doctest: +SKIP
        (1.0, 0.0, 0.5)
    """
    missing = [head for head in M3_HEADS if head not in scores]
    if missing:
        raise ValueError(
            f"search_mode_weights needs score matrices for {list(M3_HEADS)}; missing {missing} "
            "(build the dev IREvaluator with modes=('dense', 'sparse', 'colbert'))"
        )
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if not grid or any(w < 0 for w in grid):
        raise ValueError(f"grid must be non-empty and non-negative, got {list(grid)}")
    shape = (len(query_ids), len(doc_ids))
    matrices = []
    for head in M3_HEADS:
        matrix = scores[head].double()
        if tuple(matrix.shape) != shape:
            raise ValueError(f"scores[{head!r}] has shape {tuple(matrix.shape)}, expected {shape} (queries, docs)")
        if not torch.isfinite(matrix).all():
            raise ValueError(f"scores[{head!r}] has non-finite entries (re-ranked ColBERT?); score every document")
        matrices.append(matrix)
    candidates: list[tuple[float, float, float]] = []
    for triple in ([prefer] if prefer is not None else []) + list(itertools.product(sorted(set(grid)), repeat=3)):
        if max(triple) <= 0:
            continue
        triple = _normalized(triple)
        if triple not in candidates:
            candidates.append(triple)
    k = min(top_k, len(doc_ids))
    table: list[tuple[tuple[float, float, float], float]] = []
    best: tuple[tuple[float, float, float], float] | None = None
    for weights in candidates:
        combined = sum(w * m for w, m in zip(weights, matrices))
        values, indices = combined.topk(k, dim=1)
        run = {
            qid: {doc_ids[j]: float(v) for v, j in zip(vals.tolist(), idx.tolist())}
            for qid, vals, idx in zip(query_ids, values, indices)
        }
        value = compute_metrics(qrels, run)[metric]
        table.append((weights, value))
        if best is None or value > best[1]:
            best = (weights, value)
    assert best is not None
    return WeightSearchResult(weights=best[0], score=best[1], metric=metric, table=table)
