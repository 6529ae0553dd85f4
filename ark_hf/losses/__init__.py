"""Losses: modules of embeddings -> `LossOutput(loss, components)`, one call shape (`base.RetrievalLoss`), one file each."""

from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.losses.infonce import InfoNCELoss
from ark_hf.losses.m3 import M3Loss
from ark_hf.losses.matryoshka import MatryoshkaLoss
from ark_hf.losses.qwen3 import Qwen3InfoNCELoss

__all__ = [
    "InfoNCELoss",
    "LossOutput",
    "M3Loss",
    "MatryoshkaLoss",
    "Qwen3InfoNCELoss",
    "RetrievalBatch",
    "RetrievalLoss",
]
