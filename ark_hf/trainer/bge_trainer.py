"""`BGETrainer`: BGE-M3 unified fine-tuning (dense + sparse + ColBERT), self- and teacher distillation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ark_hf.data.collator import RetrievalCollator
from ark_hf.losses.m3 import M3Loss
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.teacher import TeacherScorer
from ark_hf.trainer.base import BaseRetrieverTrainer
from ark_hf.trainer.bge_config import BGETrainerConfig

logger = logging.get_logger(__name__)

__all__ = ["BGETrainer", "build_bge_model"]


def build_bge_model(config: BGETrainerConfig) -> BGEM3Model:
    """The `BGEM3Model` that `config` describes."""
    if not config.model_name_or_path:
        raise ValueError("BGETrainerConfig.model_name_or_path is required to build the model")
    return BGEM3Model(
        model_name=config.model_name_or_path,
        unified_finetuning=config.unified_finetuning,
        colbert_dim=config.colbert_dim,
        pooling=config.sentence_pooling_method,
        normalize=config.normalize_embeddings,
        init_missing_heads=config.init_missing_heads,
        trust_remote_code=config.trust_remote_code,
    )


class BGETrainer(BaseRetrieverTrainer):
    """Trainer for [`BGEM3Model`] with the BGE-M3 objectives of FlagEmbedding, computed exactly.

    Per head x (dense, sparse, ColBERT, and their ensemble) an InfoNCE loss over in-batch and hard
    negatives; with unified fine-tuning `L = (L_dense + L_inter + 0.1 L_lex + L_mul) / 4`; with
    self-distillation each head also learns the ensemble's distribution; with teacher scores (from the
    data or an online teacher) `kl_div` or `m3_kd_loss` distillation. See `ark_hf.losses.m3`.

    Args:
        model: a `BGEM3Model`; `None` builds it from `config.model_name_or_path`.
        args / config: a [`BGETrainerConfig`].
        tokenizer / processing_class: defaults to the model's tokenizer.
        train_dataset, evaluator, ...: see [`BaseRetrieverTrainer`].

    Example:
        ```python
        config = BGETrainerConfig(output_dir="out", model_name_or_path="BAAI/bge-m3", use_self_distill=True,
                                  train_data=["data/train.jsonl"])
        trainer = BGETrainer(model=None, config=config)
        trainer.train()
        ```
    """

    def __init__(
        self, model: BGEM3Model | None = None, args: BGETrainerConfig | None = None, *pargs: Any, **kwargs: Any
    ):
        config = args if args is not None else kwargs.get("config")
        if config is None:
            raise ValueError("BGETrainer needs a BGETrainerConfig (`args=` or `config=`)")
        if not isinstance(config, BGETrainerConfig):
            raise TypeError(f"BGETrainer expects a BGETrainerConfig, got {type(config).__name__}")
        if model is None:
            model = build_bge_model(config)
        if config.fix_encoder:
            model.freeze_encoder()
        if config.unified_finetuning and not model.has_heads:
            raise ValueError("unified_finetuning needs the sparse and ColBERT heads; build the model with heads")
        if getattr(model, "unified_finetuning", config.unified_finetuning) != config.unified_finetuning:
            # The config decides the objective. A model built with the other setting would skip the heads in
            # training while the loss needs them (or compute heads that nothing trains).
            logger.warning(
                "the model was built with unified_finetuning=%s but the config says %s; using the config's value",
                model.unified_finetuning,
                config.unified_finetuning,
            )
            model.unified_finetuning = config.unified_finetuning
        preset = config.loss_weights_preset
        self.loss_fn = M3Loss(
            temperature=config.temperature,
            unified_finetuning=config.unified_finetuning,
            use_self_distill=config.use_self_distill,
            self_distill_start_step=config.self_distill_start_step,
            ensemble_weights=preset["ensemble_weights"],
            loss_weights=preset["loss_weights"],
            self_distill_weights=preset["self_distill_weights"],
            in_batch=config.in_batch_negatives,
            negatives_cross_device=config.negatives_cross_device,
            kd_loss_type=config.kd_loss_type if config.knowledge_distillation else None,
            teacher_temperature=config.teacher_temperature,
        )
        self.teacher: TeacherScorer | None = None
        super().__init__(model, args, *pargs, **kwargs)
        if config.knowledge_distillation and config.teacher_model:
            self.teacher = TeacherScorer(
                config.teacher_model,
                max_length=config.teacher_max_len,
                batch_size=config.teacher_batch_size,
                device=self.args.device,
                trust_remote_code=config.trust_remote_code,
            )

    def uses_teacher_scores(self, args: BGETrainerConfig) -> bool:
        # precomputed scores come from the data unless an online teacher replaces them
        return args.knowledge_distillation and not args.teacher_model

    @staticmethod
    def load_records(sources: Any, args: BGETrainerConfig, require_teacher_scores: bool = False) -> list[dict]:
        require = args.knowledge_distillation and not args.teacher_model
        return BaseRetrieverTrainer.load_records(sources, args, require_teacher_scores=require)

    def build_collator(self, tokenizer: Any, args: BGETrainerConfig) -> RetrievalCollator:
        collator = super().build_collator(tokenizer, args)
        collator.keep_texts = bool(args.knowledge_distillation and args.teacher_model)
        return collator

    def compute_retrieval_loss(
        self, model: nn.Module, outputs: Any, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        group_size = outputs.passages.dense.shape[0] // outputs.query.dense.shape[0]
        teacher_scores = inputs.get("teacher_scores")
        if self.teacher is not None:
            teacher_scores = self.teacher.score(inputs["query_texts"], inputs["passage_texts"])
        if teacher_scores is not None:
            teacher_scores = teacher_scores.to(outputs.query.dense.device)
        return self.loss_fn(
            outputs.query,
            outputs.passages,
            group_size=group_size,
            teacher_scores=teacher_scores,
            step=self.state.global_step,
        )
