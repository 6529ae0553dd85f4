"""`QwenTrainer`: Qwen3-Embedding-style fine-tuning of a decoder embedder, and `create_qwen_trainer`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ark_hf.constants import QWEN_QUERY_FORMAT
from ark_hf.evaluation.base import Evaluator
from ark_hf.losses.base import RetrievalLoss
from ark_hf.losses.matryoshka import MatryoshkaLoss
from ark_hf.losses.qwen3 import Qwen3InfoNCELoss
from ark_hf.models.decoder import DecoderEmbedder
from ark_hf.trainer.base import BaseRetrieverTrainer
from ark_hf.trainer.qwen_config import QwenTrainerConfig

logger = logging.get_logger(__name__)

__all__ = ["QwenTrainer", "build_qwen_model", "create_qwen_trainer"]


def build_qwen_model(config: QwenTrainerConfig) -> DecoderEmbedder:
    """The `DecoderEmbedder` that `config` describes (backbone, dtype, attention kernel, LoRA, Matryoshka sizes)."""
    dtype = "auto" if config.torch_dtype == "auto" else getattr(torch, config.torch_dtype)
    targets = config.lora_target_modules
    return DecoderEmbedder(
        config.model_name_or_path,
        torch_dtype=dtype,
        attn_implementation=config.attn_implementation,
        lora=config.lora,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # peft reads the string "all-linear" as a keyword, a list as module names
        lora_target_modules=targets[0] if list(targets) == ["all-linear"] else list(targets),
        matryoshka_dims=config.matryoshka_dims,
        trust_remote_code=config.trust_remote_code,
    )


class QwenTrainer(BaseRetrieverTrainer):
    """Trainer for [`DecoderEmbedder`] with the InfoNCE of the Qwen3-Embedding report.

    Each step embeds the batch's queries (with the instruction) and passage groups (positive first; EOS
    appended, last-token pooling, L2 normalisation) and minimises [`Qwen3InfoNCELoss`]: the positive against
    the query's hard negatives, the other queries (q-q'), the other documents seen from the positive (d-d') and
    the other queries' documents (q-d'), with likely false negatives masked (a candidate scoring
    `false_negative_margin` above the positive, or a copy of the positive text, found by content hash). With
    Matryoshka sizes the loss is [`MatryoshkaLoss`] around it: `sum_k w_k L(first d_k coordinates, renormalised)`.
    Logged components: `masked_negatives` and `negatives` (candidates removed by the mask and left in the
    denominators, per step of this process) and `loss_dim_<d>` per Matryoshka size.

    With `config.curriculum` (or a `CurriculumCallback` in `callbacks`) the stages' data replace `train_data`,
    the plan sets `max_steps`, and each stage's `loss:` options go to the loss (see `ark_hf.callbacks.curriculum`).

    Args:
        model: a `DecoderEmbedder`; `None` builds it from the config (`build_qwen_model`).
        args / config: a [`QwenTrainerConfig`].
        loss: a `RetrievalLoss`; default `Qwen3InfoNCELoss` (in `MatryoshkaLoss` with `matryoshka_dims`).
        train_dataset, processing_class, evaluator, callbacks, ...: see [`BaseRetrieverTrainer`].

    Example:
        ```python
        config = QwenTrainerConfig(output_dir="out/qwen", train_data=["data/train.jsonl"], bf16=True)
        trainer = QwenTrainer(config=config)
        trainer.train()
        trainer.save_model("out/qwen/final")  # SentenceTransformer("out/qwen/final") loads it
        ```
    """

    config_class = QwenTrainerConfig

    def build_model(self, args: QwenTrainerConfig) -> DecoderEmbedder:
        return build_qwen_model(args)

    def build_loss(self, args: QwenTrainerConfig) -> RetrievalLoss:
        loss = Qwen3InfoNCELoss(args, negatives_cross_device=args.negatives_cross_device)
        return MatryoshkaLoss(loss, args.matryoshka_dims, args.matryoshka_weights) if args.matryoshka_dims else loss

    def prepare_model(self, model: nn.Module, args: QwenTrainerConfig) -> nn.Module:
        if not hasattr(model, "eos_token_id"):
            raise TypeError(
                f"QwenTrainer trains a DecoderEmbedder (EOS + last-token pooling), got {type(model).__name__}"
            )
        hidden_size = model.config.hidden_size
        if args.matryoshka_dims:
            too_large = [dim for dim in args.matryoshka_dims if dim > hidden_size]
            if too_large:
                raise ValueError(f"matryoshka_dims {too_large} exceed the model's hidden size {hidden_size}")
            if hidden_size not in args.matryoshka_dims:
                logger.warning(
                    "matryoshka_dims %s leave out the full size %d: the full embedding gets no loss of its own",
                    args.matryoshka_dims,
                    hidden_size,
                )
        if args.query_instruction and args.query_instruction_format != QWEN_QUERY_FORMAT:
            logger.warning(
                "query_instruction_format %r differs from Qwen3-Embedding's; the saved sentence-transformers "
                "'query' prompt uses Qwen's format, so encode queries yourself the way training formatted them",
                args.query_instruction_format,
            )
        return model

    def save_pretrained_kwargs(self) -> dict[str, Any]:
        return {
            "merge_lora": self.args.merge_lora_on_save,
            # sentence-transformers truncates every text to this; training never saw longer texts
            "max_seq_length": max(self.args.query_max_len, self.args.passage_max_len),
            "query_instruction": self.args.query_instruction,
        }


def create_qwen_trainer(
    dataset_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    output_dir: str | None = None,
    learning_rate: float = 6e-6,
    num_train_epochs: float = 3.0,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    *,
    model: DecoderEmbedder | None = None,
    train_dataset: Any = None,
    evaluator: Evaluator | Sequence[Evaluator] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    loss: RetrievalLoss | None = None,
    **config_fields: Any,
) -> QwenTrainer:
    """Build a [`QwenTrainer`] for Qwen3-Embedding (`Qwen/Qwen3-Embedding-0.6B` unless `model_name_or_path` says otherwise).

    Args:
        dataset_paths: training files or folders (ark, ms-swift or sentence-transformers layouts, converted on
            load and validated before anything runs). Not needed with `curriculum=` or `train_dataset=`.
        output_dir: where checkpoints and the final model go.
        learning_rate, num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps: as in
            `TrainingArguments` (gradient accumulation adds no negatives: the contrastive batch is the per-device one).
        model: an already built `DecoderEmbedder` (default: built from the config).
        train_dataset, evaluator, callbacks, loss: passed to `QwenTrainer`.
        **config_fields: any other `QwenTrainerConfig` field, e.g. `model_name_or_path`, `lora=True`, `bf16=True`,
            `curriculum="plan.yaml"`, `max_steps`, `use_cpu`.

    Example:
        ```python
        trainer = create_qwen_trainer(dataset_paths=["data/train.jsonl"], output_dir="out/qwen", learning_rate=6e-6,
                                      num_train_epochs=10, per_device_train_batch_size=8, gradient_accumulation_steps=16)
        trainer.train()
        ```
    """
    if not output_dir:
        raise ValueError("create_qwen_trainer needs an output_dir")
    known = {f.name for f in fields(QwenTrainerConfig)}
    unknown = sorted(set(config_fields) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise TypeError(f"create_qwen_trainer: unknown QwenTrainerConfig field(s): {', '.join(hints)}")
    if dataset_paths is not None:
        if "train_data" in config_fields:
            raise ValueError("pass the training data once: dataset_paths= or train_data=, not both")
        if isinstance(dataset_paths, (str, os.PathLike)):
            dataset_paths = [dataset_paths]
        config_fields["train_data"] = [os.fspath(path) for path in dataset_paths]
    if not config_fields.get("train_data") and train_dataset is None and not config_fields.get("curriculum"):
        raise ValueError("no training data: pass dataset_paths=[...], train_dataset=, or curriculum='plan.yaml'")
    config = QwenTrainerConfig(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **config_fields,
    )
    return QwenTrainer(
        model=model, args=config, train_dataset=train_dataset, evaluator=evaluator, callbacks=callbacks, loss=loss
    )
