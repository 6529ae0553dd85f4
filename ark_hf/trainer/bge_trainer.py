"""`BGETrainer`: BGE-M3 unified fine-tuning (dense + sparse + ColBERT), self- and teacher distillation."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.utils import logging

from ark_hf.data.collator import RetrievalCollator
from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.m3 import M3Loss
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.outputs import RetrieverOutput, heads_of_fields
from ark_hf.models.teacher import TeacherScorer
from ark_hf.trainer.base import BaseRetrieverTrainer
from ark_hf.trainer.bge_config import BGETrainerConfig

logger = logging.get_logger(__name__)

__all__ = ["BGETrainer", "build_bge_model"]

_DEFAULT_POOLING = BGETrainerConfig.__dataclass_fields__["sentence_pooling_method"].default


def build_bge_model(config: BGETrainerConfig) -> BGEM3Model:
    """The `BGEM3Model` that `config` describes."""
    if not config.model_name_or_path:
        raise ValueError("BGETrainerConfig.model_name_or_path is required to build the model")
    return BGEM3Model(
        model_name=config.model_name_or_path,
        unified_finetuning=config.unified_finetuning,
        colbert_dim=config.colbert_dim,
        # the default leaves the pooling to the folder (`m3_heads.json`), so a saved mean-pooled model stays mean
        pooling=None if config.sentence_pooling_method == _DEFAULT_POOLING else config.sentence_pooling_method,
        normalize=config.normalize_embeddings,
        init_missing_heads=config.init_missing_heads,
        trust_remote_code=config.trust_remote_code,
    )


class BGETrainer(BaseRetrieverTrainer):
    """Trainer for [`BGEM3Model`] with the BGE-M3 objectives of FlagEmbedding, computed exactly.

    Per head x (dense, sparse, ColBERT, and their ensemble) an InfoNCE loss over in-batch and hard
    negatives; with unified fine-tuning `L = (L_dense + L_inter + 0.1 L_lex + L_mul) / 4`; with
    self-distillation each head also learns the ensemble's distribution; with teacher scores (from the
    data or an online teacher) `kl_div` or `m3_kd_loss` distillation. The default loss is the config's
    [`M3Loss`]; `loss=` takes any `RetrievalLoss`.

    Args:
        model: a `BGEM3Model`; `None` builds it from `config.model_name_or_path` (after the data is validated).
        args / config: a [`BGETrainerConfig`].
        tokenizer / processing_class: defaults to the model's tokenizer.
        loss: a `RetrievalLoss`; default `M3Loss` from the config.
        train_dataset, evaluator, ...: see [`BaseRetrieverTrainer`].

    Example:
        ```python
        config = BGETrainerConfig(output_dir="out", model_name_or_path="BAAI/bge-m3", use_self_distill=True,
                                  train_data=["data/train.jsonl"])
        trainer = BGETrainer(model=None, config=config)
        trainer.train()
        ```
    """

    config_class = BGETrainerConfig

    def __init__(
        self, model: BGEM3Model | None = None, args: BGETrainerConfig | None = None, *pargs: Any, **kwargs: Any
    ):
        self.teacher: TeacherScorer | None = None
        super().__init__(model, args, *pargs, **kwargs)
        config = self.args
        if config.knowledge_distillation and config.teacher_model:
            self.teacher = TeacherScorer(
                config.teacher_model,
                max_length=config.teacher_max_len,
                batch_size=config.teacher_batch_size,
                device=self.args.device,
                trust_remote_code=config.trust_remote_code,
            )

    def build_model(self, args: BGETrainerConfig) -> BGEM3Model:
        return build_bge_model(args)

    def build_loss(self, args: BGETrainerConfig) -> M3Loss:
        preset = args.loss_weights_preset
        return M3Loss(
            temperature=args.temperature,
            unified_finetuning=args.unified_finetuning,
            use_self_distill=args.use_self_distill,
            self_distill_start_step=args.self_distill_start_step,
            ensemble_weights=preset["ensemble_weights"],
            loss_weights=preset["loss_weights"],
            self_distill_weights=preset["self_distill_weights"],
            in_batch=args.in_batch_negatives,
            negatives_cross_device=args.negatives_cross_device,
            cross_device_heads=args.cross_device_heads,
            mask_other_positives=args.mask_other_positives,
            colbert_chunk_size=args.colbert_chunk_size,
            kd_loss_type=args.kd_loss_type if args.knowledge_distillation else None,
            teacher_temperature=args.teacher_temperature,
            train_heads=args.trained_heads,
        )

    def prepare_model(self, model: nn.Module, args: BGETrainerConfig) -> nn.Module:
        pooling = getattr(model, "pooling", None)
        if pooling is not None and pooling != args.sentence_pooling_method:
            # pooling is one setting: the model's. A config that names another one explicitly is a conflict.
            if args.sentence_pooling_method != _DEFAULT_POOLING:
                raise ValueError(
                    f"pooling conflict: the model pools with {pooling!r} (BGEM3Model(pooling={pooling!r})) but the "
                    f"config says sentence_pooling_method={args.sentence_pooling_method!r}; make them agree, or "
                    "let the trainer build the model from the config (BGETrainer(config=config), no model=)"
                )
            logger.info(
                "the model pools with %r; sentence_pooling_method (left at its default %r) set to match",
                pooling,
                args.sentence_pooling_method,
            )
            args.sentence_pooling_method = pooling
        if args.fix_encoder:
            model.freeze_encoder()
        # the loss decides which heads train (the base trainer then tells the model what to compute); a model built
        # with the other `unified_finetuning` follows it
        loss_heads = heads_of_fields(self.loss.heads)
        heads = {"sparse": getattr(model, "sparse_linear", None), "colbert": getattr(model, "colbert_linear", None)}
        for head, module in heads.items():
            if module is not None and loss_heads != ("dense",) and head not in loss_heads:
                module.requires_grad_(False)  # not in `heads`: kept as loaded (and no unused parameters under DDP)
        return model

    @staticmethod
    def uses_teacher_scores(args: BGETrainerConfig) -> bool:
        # precomputed scores come from the data unless an online teacher replaces them
        return args.knowledge_distillation and not args.teacher_model

    def build_collator(
        self, tokenizer: Any, args: BGETrainerConfig, model: nn.Module | None = None
    ) -> RetrievalCollator:
        collator = super().build_collator(tokenizer, args, model)
        collator.keep_texts = bool(args.knowledge_distillation and args.teacher_model)
        return collator

    def retrieval_batch(self, inputs: dict[str, Any], outputs: RetrieverOutput) -> RetrievalBatch:
        batch = super().retrieval_batch(inputs, outputs)
        if self.teacher is not None:  # the online teacher scores the same groups, without grad
            batch.teacher_scores = self.teacher.score(inputs["query_texts"], inputs["passage_texts"]).to(
                outputs.query.dense.device
            )
        return batch
