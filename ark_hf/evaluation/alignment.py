"""Alignment of a retriever with ARK's triple-alignment scores on a fixed probe set.

The probe set is the output of `ark_hf.alignment.score_file` (questions, their candidate chunks, and each
chunk's S_f, S_b, S_v). For the retriever being trained, with scores s(q, c) = cos(E(q), E(c)):

    align/forward   = mean over probe questions of Spearman(s(q, .), S_f(.))
    align/backward  = mean over probe questions of Spearman(s(q, .), S_b(.))
    align/parameter = mean over probe questions of Spearman(s(q, .), s_base(q, .))

`s_base` is the base retriever's cosine: the stored S_v, or the scores of the model at the start of
training (`set_anchor`). `align/parameter` falls from 1 as the model drifts from its anchor. Questions with
fewer than two candidates, or with a constant score, have no Spearman and are left out of the mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from ark_hf.data.dataset import format_instruction
from ark_hf.evaluation.base import eval_mode
from ark_hf.models.encoding import encode_dense

__all__ = ["AlignmentEvaluator", "load_probe"]

SCORE_KEYS = {"forward": "forward", "backward": "backward", "parameter": "parameter"}
CANDIDATE_FIELDS = ("pos", "neg", "candidates")


def load_probe(path: str | Path, max_queries: int | None = None) -> list[dict[str, Any]]:
    """Scored records from a jsonl written by `score_file`, in file order (at most `max_queries`)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            record = json.loads(text)
            if "alignment" not in record:
                raise ValueError(
                    f"{path}:{number}: field 'alignment': missing; score the probe with compute_alignment"
                )
            records.append(record)
            if max_queries is not None and len(records) >= max_queries:
                break
    return records


def _spearman(a: Sequence[float], b: Sequence[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b) if y is not None]
    if len(pairs) < 2:
        return None
    x, y = zip(*pairs)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(spearmanr(x, y).statistic)
    return None if math.isnan(value) else value


class AlignmentEvaluator:
    """Mean per-question Spearman between the retriever's scores and the forward, backward and anchor scores.

    Satisfies the evaluator protocol (`ark_hf.evaluation.base.Evaluator`): `evaluator(model)` returns
    `{"align/forward": ..., "align/backward": ..., "align/parameter": ...}`, which `BaseRetrieverTrainer`
    logs as `eval_align/forward`, ... (usable as `metric_for_best_model`).

    Args:
        probe: scored records (`load_probe`) or the path of a scored jsonl.
        query_instruction, query_instruction_format: the training-time query instruction.
        query_max_len, passage_max_len, batch_size: encoding settings.
        max_queries: use the first `max_queries` records.

    Example:
        ```python
        evaluator = AlignmentEvaluator("probe.align.jsonl", query_max_len=64, passage_max_len=256)
        trainer = QwenTrainer(model=model, args=config, evaluator=[ir_evaluator, evaluator])
        ```
    """

    def __init__(
        self,
        probe: Sequence[Mapping[str, Any]] | str | Path,
        *,
        query_instruction: str | None = None,
        query_instruction_format: str = "{}{}",
        query_max_len: int = 64,
        passage_max_len: int = 256,
        batch_size: int = 64,
        max_queries: int | None = None,
    ) -> None:
        records = load_probe(probe, max_queries) if isinstance(probe, (str, Path)) else list(probe)[:max_queries]
        if not records:
            raise ValueError("the alignment probe set is empty")
        self.queries: list[str] = []
        self.chunks: list[list[str]] = []
        self.targets: dict[str, list[list[float | None]]] = {key: [] for key in SCORE_KEYS}
        self.combined: list[list[float]] = []
        for record in records:
            alignment = record["alignment"]
            chunks, entries = [], []
            for name in CANDIDATE_FIELDS:
                if name in alignment:
                    chunks.extend(record[name])
                    entries.extend(alignment[name])
            self.queries.append(format_instruction(record["query"], query_instruction, query_instruction_format))
            self.chunks.append(chunks)
            for key, field in SCORE_KEYS.items():
                self.targets[key].append([entry.get(field) for entry in entries])
            self.combined.append([entry.get("score", 0.0) for entry in entries])
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.queries)

    def shard(self, rank: int, world_size: int) -> list[int]:
        """The probe questions a process scores: every `world_size`-th from `rank`."""
        return list(range(rank, len(self.queries), world_size))

    def retriever_scores(
        self, model: Any, indices: Sequence[int] | None = None, pad_to: int | None = None
    ) -> list[torch.Tensor]:
        """s(q, c) for the probe questions `indices` (all by default), one `[num_candidates]` tensor each.

        Gradients follow the caller's grad mode. `pad_to` repeats texts so that every process runs the same
        number of forward passes (ZeRO-3 / FSDP gather parameters collectively in each forward).
        """
        indices = list(range(len(self.queries))) if indices is None else list(indices)
        queries = [self.queries[i] for i in indices]
        chunks = [c for i in indices for c in self.chunks[i]]
        if pad_to is not None and indices:
            queries += [queries[0]] * (pad_to - len(indices))
            chunks += [chunks[0]] * (pad_to * self._max_candidates() - len(chunks))
        q = encode_dense(model, queries, max_length=self.query_max_len, batch_size=self.batch_size)
        d = encode_dense(model, chunks, max_length=self.passage_max_len, batch_size=self.batch_size)
        out, offset = [], 0
        for row, i in enumerate(indices):
            n = len(self.chunks[i])
            out.append(d[offset : offset + n] @ q[row])
            offset += n
        return out

    def _max_candidates(self) -> int:
        return max(len(c) for c in self.chunks)

    def set_anchor(self, model: Any) -> None:
        """Use `model`'s current scores as the base retriever's (the parameter score's anchor)."""
        with torch.no_grad(), eval_mode(model):
            scores = self.retriever_scores(model)
        self.targets["parameter"] = [[float(x) for x in s] for s in scores]

    def spearman_sums(self, model: Any, rank: int = 0, world_size: int = 1) -> dict[str, tuple[float, int]]:
        """`{key: (sum of per-question Spearman, number of questions)}` over this process's shard."""
        indices = self.shard(rank, world_size)
        longest = len(self.shard(0, world_size))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = self.retriever_scores(model, indices, pad_to=longest if world_size > 1 else None)
        finally:
            model.train(was_training)
        sums: dict[str, tuple[float, int]] = {}
        for key in SCORE_KEYS:
            values = [_spearman(s.tolist(), self.targets[key][i]) for s, i in zip(scores, indices)]
            values = [v for v in values if v is not None]
            sums[key] = (float(sum(values)), len(values))
        return sums

    @property
    def metric_names(self) -> list[str]:
        """The keys `__call__` returns (so `metric_for_best_model` is checked before training)."""
        return [f"align/{key}" for key in SCORE_KEYS]

    def __call__(self, model: Any) -> dict[str, float]:
        """The three mean Spearman correlations on the whole probe set (NaN when no question has one)."""
        return {
            f"align/{key}": total / count if count else float("nan")
            for key, (total, count) in self.spearman_sums(model).items()
        }
