"""ark_hf: fine-tune retrieval embedders (BGE-M3, Qwen3-Embedding) with transformers.Trainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "BGEM3Model": "ark_hf.models.bge_m3",
    "DecoderEmbedder": "ark_hf.models.decoder",
    "BaseRetrieverTrainer": "ark_hf.trainer.base",
    "BGETrainerConfig": "ark_hf.trainer.bge_config",
    "BGETrainer": "ark_hf.trainer.bge_trainer",
    "QwenTrainerConfig": "ark_hf.trainer.qwen_config",
    "QwenTrainer": "ark_hf.trainer.qwen_trainer",
    "create_qwen_trainer": "ark_hf.trainer.qwen_trainer",
    "CurriculumCallback": "ark_hf.callbacks.curriculum",
    "AlignmentCallback": "ark_hf.callbacks.alignment",
    "IREvaluator": "ark_hf.evaluation.ir",
    "load_training_records": "ark_hf.data.loading",
    "DataValidationError": "ark_hf.data.schema",
}

__all__ = [
    "AlignmentCallback",
    "BGEM3Model",
    "BGETrainer",
    "BGETrainerConfig",
    "BaseRetrieverTrainer",
    "CurriculumCallback",
    "DataValidationError",
    "DecoderEmbedder",
    "IREvaluator",
    "QwenTrainer",
    "QwenTrainerConfig",
    "create_qwen_trainer",
    "load_training_records",
]

if TYPE_CHECKING:  # pragma: no cover
    from ark_hf.callbacks.curriculum import CurriculumCallback
    from ark_hf.data.loading import load_training_records
    from ark_hf.data.schema import DataValidationError
    from ark_hf.evaluation.ir import IREvaluator
    from ark_hf.models.bge_m3 import BGEM3Model
    from ark_hf.models.decoder import DecoderEmbedder
    from ark_hf.trainer.base import BaseRetrieverTrainer
    from ark_hf.trainer.bge_config import BGETrainerConfig
    from ark_hf.trainer.bge_trainer import BGETrainer
    from ark_hf.trainer.qwen_config import QwenTrainerConfig
    from ark_hf.trainer.qwen_trainer import QwenTrainer, create_qwen_trainer


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ark_hf' has no attribute {name!r}")
