"""ark_hf: fine-tune retrieval embedders (BGE-M3, Qwen3-Embedding) with transformers.Trainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ark_hf.utils.quiet import silence_deepspeed_cpu_notice

__version__ = "0.1.0"

silence_deepspeed_cpu_notice()  # accelerate's DeepSpeed probe on each save would print it on every CPU machine

# module -> public names it defines; `ark_hf.<name>` imports the module on first use (as transformers' _LazyModule)
_import_structure: dict[str, list[str]] = {
    "ark_hf.models.bge_m3": ["BGEM3Model"],
    "ark_hf.models.decoder": ["DecoderEmbedder"],
    "ark_hf.trainer.base": ["BaseRetrieverTrainer"],
    "ark_hf.trainer.bge_config": ["BGETrainerConfig"],
    "ark_hf.trainer.bge_trainer": ["BGETrainer"],
    "ark_hf.trainer.qwen_config": ["QwenTrainerConfig"],
    "ark_hf.trainer.qwen_trainer": ["QwenTrainer", "create_qwen_trainer"],
    "ark_hf.callbacks.alignment": ["AlignmentCallback"],
    "ark_hf.callbacks.curriculum": ["CurriculumCallback"],
    "ark_hf.callbacks.hard_negatives": ["HardNegativeRefresh"],
    "ark_hf.evaluation.alignment": ["AlignmentEvaluator"],
    "ark_hf.evaluation.base": ["Evaluator"],
    "ark_hf.evaluation.ir": ["IREvaluator"],
    "ark_hf.losses.base": ["LossOutput", "RetrievalBatch", "RetrievalLoss"],
    "ark_hf.losses.infonce": ["InfoNCELoss"],
    "ark_hf.losses.m3": ["M3Loss"],
    "ark_hf.losses.matryoshka": ["MatryoshkaLoss"],
    "ark_hf.losses.qwen3": ["Qwen3InfoNCELoss"],
    "ark_hf.data.loading": ["load_training_records"],
    "ark_hf.data.schema": ["DataValidationError"],
}
_LAZY = {name: module for module, names in _import_structure.items() for name in names}
__all__ = [
    "AlignmentCallback",
    "AlignmentEvaluator",
    "BGEM3Model",
    "BGETrainer",
    "BGETrainerConfig",
    "BaseRetrieverTrainer",
    "CurriculumCallback",
    "DataValidationError",
    "DecoderEmbedder",
    "Evaluator",
    "HardNegativeRefresh",
    "IREvaluator",
    "InfoNCELoss",
    "LossOutput",
    "M3Loss",
    "MatryoshkaLoss",
    "Qwen3InfoNCELoss",
    "QwenTrainer",
    "QwenTrainerConfig",
    "RetrievalBatch",
    "RetrievalLoss",
    "create_qwen_trainer",
    "load_training_records",
]

if TYPE_CHECKING:  # pragma: no cover
    from ark_hf.callbacks.alignment import AlignmentCallback
    from ark_hf.callbacks.curriculum import CurriculumCallback
    from ark_hf.callbacks.hard_negatives import HardNegativeRefresh
    from ark_hf.data.loading import load_training_records
    from ark_hf.data.schema import DataValidationError
    from ark_hf.evaluation.alignment import AlignmentEvaluator
    from ark_hf.evaluation.base import Evaluator
    from ark_hf.evaluation.ir import IREvaluator
    from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
    from ark_hf.losses.infonce import InfoNCELoss
    from ark_hf.losses.m3 import M3Loss
    from ark_hf.losses.matryoshka import MatryoshkaLoss
    from ark_hf.losses.qwen3 import Qwen3InfoNCELoss
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
