"""Retrieval evaluation during training: encode a corpus with the model being trained, retrieve, score.

Metrics come from ir-measures (pytrec_eval underneath): nDCG@10, MRR@10 (RR@10), Recall@10, Recall@100
and MAP. Keys are `{mode}_{metric}` (e.g. `dense_ndcg@10`); the Trainer prefixes them with `eval_`, so
`metric_for_best_model="dense_ndcg@10"` and `load_best_model_at_end` work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ark_hf.data.dataset import format_instruction
from ark_hf.evaluation.base import eval_mode

logger = logging.get_logger(__name__)

__all__ = ["EvalDataError", "IREvaluator", "METRICS", "compute_metrics", "load_ir_data"]

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map")
MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")


def compute_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """Aggregate METRICS of a run (`qid -> {doc_id: score}`) against qrels (`qid -> {doc_id: relevance}`)."""
    import ir_measures  # imported here: training without evaluation does not need it

    measures = {
        "ndcg@10": ir_measures.nDCG @ 10,
        "mrr@10": ir_measures.RR @ 10,
        "recall@10": ir_measures.R @ 10,
        "recall@100": ir_measures.R @ 100,
        "map": ir_measures.AP,
    }
    aggregated = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {key: float(aggregated[measure]) for key, measure in measures.items()}


class EvalDataError(ValueError):
    """An evaluation set that cannot be scored as given; the message lists every problem (file and key)."""


def load_ir_data(
    path: str | Path, *, max_errors: int = 20
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """Read and validate an evaluation set from one JSON file `{"queries": {...}, "corpus": {...}, "qrels": {...}}`.

    `queries` and `corpus` map ids to non-empty strings, `qrels` maps a query id to `{doc_id: relevance}`
    (an integer; > 0 is relevant). Checked before any model loads, each problem named by file and key:
    a key given twice, an empty corpus, qrels written as lists, non-string texts, qrels naming a query or a
    document that is not in `queries` / `corpus` (scored silently, they would lower recall), no relevant
    document at all.

    Example message:
        `dev.json: key 'qrels.q7': names document 'd9' that is not in 'corpus'`

    Raises:
        EvalDataError: listing up to `max_errors` problems.
        FileNotFoundError: the file does not exist.
    """
    from ark_hf.data.loading import _duplicate_keys, _object_pairs, _preview

    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{path}:{error.lineno}: invalid JSON: {error.msg} at column {error.colno}") from error
    except UnicodeDecodeError as error:
        raise EvalDataError(f"{path}: invalid UTF-8 ({error.reason})") from error
    problems: list[str] = []

    def problem(key: str, message: str) -> None:
        problems.append(f"{path}: key '{key}': {message}")

    if not isinstance(data, dict):
        raise EvalDataError(
            f"{path}: expected an object with 'queries', 'corpus' and 'qrels', got {type(data).__name__}"
        )
    for key, first in _duplicate_keys(data):
        problem(key, f"given twice (the first value was {_preview(first)}); keep one of them")
    for key in ("queries", "corpus", "qrels"):
        if key not in data:
            problem(key, "missing; expected an object")
        elif not isinstance(data[key], dict):
            shape = ' ({qid: {doc_id: relevance}}, e.g. {"q1": {"d3": 1}})' if key == "qrels" else ""
            problem(key, f"expected an object{shape}, got {type(data[key]).__name__}")
    if problems:
        raise EvalDataError("evaluation data failed validation:\n" + "\n".join(problems))
    queries = {str(k): v for k, v in data["queries"].items()}
    corpus = {str(k): v for k, v in data["corpus"].items()}
    if not corpus:
        problem("corpus", "is empty; there is nothing to retrieve")
    for table_name, table in (("queries", queries), ("corpus", corpus)):
        for key, text in table.items():
            if not isinstance(text, str) or not text.strip():
                got = type(text).__name__ if not isinstance(text, str) else "an empty string"
                problem(f"{table_name}.{key}", f"expected a non-empty string, got {got}")
    qrels: dict[str, dict[str, int]] = {}
    for qid, docs in data["qrels"].items():
        qid = str(qid)
        if not isinstance(docs, dict):
            problem(
                f"qrels.{qid}",
                f"expected an object {{doc_id: relevance}}, got {type(docs).__name__} ({_preview(docs)})",
            )
            continue
        if qid not in queries:
            problem(f"qrels.{qid}", "names a query that is not in 'queries'")
        judged: dict[str, int] = {}
        for doc_id, relevance in docs.items():
            doc_id = str(doc_id)
            if isinstance(relevance, bool) or not isinstance(relevance, int):
                problem(f"qrels.{qid}.{doc_id}", f"expected an integer relevance, got {type(relevance).__name__}")
                continue
            if doc_id not in corpus:
                problem(f"qrels.{qid}", f"names document '{doc_id}' that is not in 'corpus'")
            judged[doc_id] = relevance
        qrels[qid] = judged
    if not problems and not any(r > 0 for docs in qrels.values() for r in docs.values()):
        problem("qrels", "no query has a relevant document (relevance > 0)")
    if problems:
        shown = problems[:max_errors]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise EvalDataError(f"evaluation data failed validation ({len(problems)} errors):\n" + "\n".join(shown) + more)
    return queries, corpus, qrels


class IREvaluator:
    """Encode queries and corpus, rank the corpus for each query, report metrics per scoring mode.

    Args:
        queries: `qid -> text`.
        corpus: `doc_id -> text`.
        qrels: `qid -> {doc_id: relevance}` (relevance > 0 is relevant).
        modes: scoring modes among `dense`, `sparse`, `colbert`, `dense+sparse`, `all`; the sparse and
            ColBERT modes need a model with those heads (BGE-M3).
        weights: (dense, sparse, colbert) weights of the combined modes (BGE-M3: 1, 0.3, 1).
        query_instruction, query_instruction_format: instruction for queries (Qwen3: `"Instruct: {}\\nQuery:{}"`).
        query_max_len, passage_max_len, batch_size: encoding settings.
        top_k: documents kept per query in the run (must cover Recall@100).
        rerank_top_k: score ColBERT (and `all`) only on each query's top candidates by dense+sparse, as BGE-M3's
            evaluation does (the paper re-ranks the top 200); `None` scores every document (exact, for dev sets).
        name: prefix for the metric keys (`{name}_{mode}_{metric}`), to evaluate several sets.
        show_progress_bar: tqdm bars while encoding queries and documents; `None`: shown on a terminal only
            (the recipes follow the Trainer's `disable_tqdm`).
    """

    def __init__(
        self,
        queries: Mapping[str, str],
        corpus: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        modes: Sequence[str] = ("dense",),
        weights: tuple[float, float, float] = (1.0, 0.3, 1.0),
        query_instruction: str | None = None,
        query_instruction_format: str = "{}{}",
        query_max_len: int = 64,
        passage_max_len: int = 256,
        batch_size: int = 64,
        top_k: int = 100,
        rerank_top_k: int | None = None,
        name: str = "",
        show_progress_bar: bool | None = None,
    ) -> None:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown evaluation modes {unknown}; choose from {MODES}")
        self.query_ids = [q for q in queries if q in qrels]
        if not self.query_ids:
            raise ValueError("no query of the evaluation set has qrels")
        self.queries = [
            format_instruction(queries[q], query_instruction, query_instruction_format) for q in self.query_ids
        ]
        self.doc_ids = list(corpus)
        self.corpus = [corpus[d] for d in self.doc_ids]
        self.qrels = {q: dict(qrels[q]) for q in self.query_ids}
        self.modes = tuple(modes)
        self.weights = weights
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.batch_size = batch_size
        self.top_k = top_k
        if rerank_top_k is not None and rerank_top_k < 1:
            raise ValueError(f"rerank_top_k must be >= 1, got {rerank_top_k}")
        self.rerank_top_k = rerank_top_k
        self.name = name
        self.show_progress_bar = show_progress_bar

    @torch.no_grad()
    def _encode(
        self, model: Any, texts: list[str], max_length: int, need_heads: bool, desc: str = "Encoding"
    ) -> dict[str, Any]:
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        dense, lexical, colbert = [], [], []
        # show_progress_bar None: tqdm decides (shown on a terminal); the recipes set it from `disable_tqdm`
        disable = None if self.show_progress_bar is None else not self.show_progress_bar
        starts = tqdm(range(0, len(texts), self.batch_size), desc=desc, unit="batch", leave=False, disable=disable)
        for start in starts:
            features = model.tokenize(texts[start : start + self.batch_size], max_length)
            features = {k: v.to(device) for k, v in features.items()}
            out = model.encode_features(features)
            dense.append(out.dense.float().cpu())
            if need_heads:
                if out.sparse_weights is None or out.colbert is None:
                    raise ValueError("sparse/colbert evaluation modes need a model whose heads are trained (unified)")
                for ids, weights in zip(out.input_ids.cpu().numpy(), out.sparse_weights.float().cpu().numpy()):
                    entry: dict[int, float] = {}
                    for token_id, weight in zip(ids.tolist(), weights.tolist()):
                        if weight > entry.get(token_id, 0.0):
                            entry[token_id] = weight
                    lexical.append(entry)
                lengths = out.colbert_mask.sum(1).cpu().tolist()
                for vecs, n in zip(out.colbert.float().cpu(), lengths):
                    colbert.append(vecs[: int(n)].clone())
        return {"dense": torch.cat(dense), "lexical": lexical, "colbert": colbert}

    @staticmethod
    def _lexical_matrix(entries: list[dict[int, float]]) -> Any:
        from scipy import sparse as sp

        rows, cols, vals = [], [], []
        for row, entry in enumerate(entries):
            rows.extend([row] * len(entry))
            cols.extend(entry.keys())
            vals.extend(entry.values())
        width = (max(cols) + 1) if cols else 1
        return sp.csr_matrix((vals, (rows, cols)), shape=(len(entries), width), dtype=np.float32)

    @staticmethod
    def _colbert_scores(
        queries: list[torch.Tensor], docs: list[torch.Tensor], candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean over query tokens of the max similarity over the document's real tokens.

        With `candidates` (`[num_queries, k]` document indices) only those pairs are scored; the rest stay -inf.
        """
        dim = queries[0].shape[-1]
        max_len = max(d.shape[0] for d in docs)
        padded = torch.zeros(len(docs), max_len, dim)
        mask = torch.zeros(len(docs), max_len, dtype=torch.bool)
        for i, d in enumerate(docs):
            padded[i, : d.shape[0]] = d
            mask[i, : d.shape[0]] = True
        scores = torch.full((len(queries), len(docs)), float("-inf"))
        for qi, q in enumerate(queries):
            index = candidates[qi] if candidates is not None else slice(None)
            sims = torch.einsum("id,njd->nij", q, padded[index]).masked_fill(~mask[index][:, None, :], float("-inf"))
            scores[qi, index] = sims.max(-1).values.mean(-1)
        return scores

    def score_matrices(self, model: Any) -> dict[str, torch.Tensor]:
        """`[num_queries, num_docs]` scores for each mode."""
        need_heads = any(m != "dense" for m in self.modes)
        q = self._encode(model, self.queries, self.query_max_len, need_heads, desc="Encoding queries")
        d = self._encode(model, self.corpus, self.passage_max_len, need_heads, desc="Encoding documents")
        scores = {"dense": q["dense"] @ d["dense"].T}
        if need_heads:
            q_lex, d_lex = self._lexical_matrix(q["lexical"]), self._lexical_matrix(d["lexical"])
            width = max(q_lex.shape[1], d_lex.shape[1])
            q_lex.resize((q_lex.shape[0], width))
            d_lex.resize((d_lex.shape[0], width))
            scores["sparse"] = torch.from_numpy((q_lex @ d_lex.T).toarray().astype(np.float32))
            w_dense, w_sparse, w_colbert = self.weights
            scores["dense+sparse"] = w_dense * scores["dense"] + w_sparse * scores["sparse"]
            candidates = None
            if self.rerank_top_k is not None and self.rerank_top_k < len(self.corpus):
                # BGE-M3's evaluation: multi-vector scores re-rank the first stage's top candidates
                candidates = scores["dense+sparse"].topk(self.rerank_top_k, dim=1).indices
            scores["colbert"] = self._colbert_scores(q["colbert"], d["colbert"], candidates)
            scores["all"] = scores["dense+sparse"] + w_colbert * scores["colbert"]
        return {mode: scores[mode] for mode in self.modes}

    def _run(self, scores: torch.Tensor) -> dict[str, dict[str, float]]:
        k = min(self.top_k, scores.shape[1])
        values, indices = scores.topk(k, dim=1)
        return {
            qid: {self.doc_ids[j]: float(v) for v, j in zip(vals.tolist(), idx.tolist()) if v != float("-inf")}
            for qid, vals, idx in zip(self.query_ids, values, indices)
        }

    def __call__(self, model: Any) -> dict[str, float]:
        """Evaluate `model` (must offer `tokenize(texts, max_length)` and `encode_features(features)`)."""
        with eval_mode(model):
            matrices = self.score_matrices(model)
        prefix = f"{self.name}_" if self.name else ""
        metrics: dict[str, float] = {}
        for mode, scores in matrices.items():
            for key, value in compute_metrics(self.qrels, self._run(scores)).items():
                metrics[f"{prefix}{mode}_{key}"] = value
        return metrics


def ir_data_from_pairs(pairs: Iterable[tuple[str, str, str]]) -> tuple[dict, dict, dict]:
    """(query_id, query, relevant passage) triples -> queries, corpus, qrels (passages deduplicated)."""
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    doc_by_text: dict[str, str] = {}
    for qid, query, passage in pairs:
        doc_id = doc_by_text.setdefault(passage, f"d{len(doc_by_text)}")
        corpus[doc_id] = passage
        queries[qid] = query
        qrels.setdefault(qid, {})[doc_id] = 1
    return queries, corpus, qrels
