"""`QwenTrainer`: Qwen3-Embedding-style fine-tuning of a decoder embedder, and `create_qwen_trainer`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.utils import logging

from ark_hf.callbacks.curriculum import CurriculumCallback
from ark_hf.data.collator import RetrievalCollator
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.evaluation.ir import IREvaluator
from ark_hf.losses.infonce import qwen3_infonce_loss
from ark_hf.models.decoder import DecoderEmbedder, truncate_embeddings
from ark_hf.trainer.base import TRAINING_ARGS_NAME, BaseRetrieverTrainer
from ark_hf.trainer.qwen_config import QwenTrainerConfig, check_loss_options

logger = logging.get_logger(__name__)

__all__ = ["QwenTrainer", "build_qwen_model", "create_qwen_trainer"]

QWEN_QUERY_FORMAT = "Instruct: {}\nQuery:{}"


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
    appended, last-token pooling, L2 normalisation) and minimises `ark_hf.losses.infonce.qwen3_infonce_loss`:
    the positive against the query's hard negatives, the other queries (q-q'), the other documents seen from
    the positive (d-d') and the other queries' documents (q-d'), with likely false negatives masked (a
    candidate scoring `false_negative_margin` above the positive, or a copy of the positive text, found by
    content hash). With Matryoshka sizes the loss is `sum_k w_k L(first d_k coordinates, renormalised)`.
    Logged components: `masked_negatives` and `negatives` (candidates removed by the mask and left in the
    denominators, per step of this process) and `loss_dim_<d>` per Matryoshka size.

    With `config.curriculum` (or a `CurriculumCallback` in `callbacks`) the stages' data replace
    `train_data`, and the plan sets `max_steps` (see `ark_hf.callbacks.curriculum`).

    Args:
        model: a `DecoderEmbedder`; `None` builds it from the config (`build_qwen_model`).
        args / config: a [`QwenTrainerConfig`].
        train_dataset: records or a `TrainGroupDataset`; `None` loads `config.train_data`.
        processing_class / tokenizer: defaults to the model's tokenizer.
        evaluator, callbacks, ...: see [`BaseRetrieverTrainer`].

    Example:
        ```python
        config = QwenTrainerConfig(output_dir="out/qwen", train_data=["data/train.jsonl"], bf16=True)
        trainer = QwenTrainer(config=config)
        trainer.train()
        trainer.save_model("out/qwen/final")  # SentenceTransformer("out/qwen/final") loads it
        ```
    """

    def __init__(
        self,
        model: DecoderEmbedder | None = None,
        args: QwenTrainerConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Callable | None = None,
        evaluator: IREvaluator | Sequence[IREvaluator] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ) -> None:
        config = args if args is not None else kwargs.get("config")
        if config is None:
            raise ValueError("QwenTrainer needs a QwenTrainerConfig (`args=` or `config=`)")
        if not isinstance(config, QwenTrainerConfig):
            raise TypeError(f"QwenTrainer expects a QwenTrainerConfig, got {type(config).__name__}")
        callbacks = list(callbacks or [])
        curriculum = self._resolve_curriculum(config, callbacks)
        if curriculum is not None:
            if train_dataset is not None or config.train_data:
                raise ValueError("a curriculum names its own data: pass no train_dataset / train_data with it")
            # every stage's data is read and validated before the model loads or anything is written
            curriculum.load_data(lambda sources: self.load_records(sources, config))
        else:
            train_dataset = self._validated_records(train_dataset, config)
        if model is None:
            model = build_qwen_model(config)
        self._check_model(model, config)
        self._eos_token_id = model.eos_token_id
        self.loss_options: dict[str, Any] = dict(config.loss_options)
        self.curriculum = curriculum
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            data_collator,
            evaluator,
            callbacks,
            **kwargs,
        )
        if curriculum is not None:
            curriculum.bind(self)
            self.train_dataset = curriculum.dataset()

    @staticmethod
    def _resolve_curriculum(config: QwenTrainerConfig, callbacks: list[TrainerCallback]) -> CurriculumCallback | None:
        given = [callback for callback in callbacks if isinstance(callback, CurriculumCallback)]
        if len(given) > 1:
            raise ValueError("pass at most one CurriculumCallback")
        if config.curriculum:
            if given:
                raise ValueError("config.curriculum is set and a CurriculumCallback is passed too; keep one plan")
            callback = CurriculumCallback.from_yaml(config.curriculum)
            callbacks.append(callback)
            return callback
        return given[0] if given else None

    def _validated_records(self, train_dataset: Any, config: QwenTrainerConfig) -> Any:
        """Read and validate the training data now, before the model loads (the base class would after)."""
        if train_dataset is None:
            return self.load_records(config.train_data, config) if config.train_data else None
        if isinstance(train_dataset, TrainGroupDataset):
            return train_dataset
        if isinstance(train_dataset, list) and train_dataset and isinstance(train_dataset[0], dict):
            if "source_index" in train_dataset[0]:  # records that went through load_training_records
                return train_dataset
            import datasets

            train_dataset = datasets.Dataset.from_list(train_dataset)
        return self.load_records(train_dataset, config)

    @staticmethod
    def _check_model(model: nn.Module, config: QwenTrainerConfig) -> None:
        if not hasattr(model, "eos_token_id"):
            raise TypeError(
                f"QwenTrainer trains a DecoderEmbedder (EOS + last-token pooling), got {type(model).__name__}"
            )
        hidden_size = model.config.hidden_size
        if config.matryoshka_dims:
            too_large = [dim for dim in config.matryoshka_dims if dim > hidden_size]
            if too_large:
                raise ValueError(f"matryoshka_dims {too_large} exceed the model's hidden size {hidden_size}")
            if hidden_size not in config.matryoshka_dims:
                logger.warning(
                    "matryoshka_dims %s leave out the full size %d: the full embedding gets no loss of its own",
                    config.matryoshka_dims,
                    hidden_size,
                )
        if config.query_instruction and config.query_instruction_format != QWEN_QUERY_FORMAT:
            logger.warning(
                "query_instruction_format %r differs from Qwen3-Embedding's; the saved sentence-transformers "
                "'query' prompt uses Qwen's format, so encode queries yourself the way training formatted them",
                config.query_instruction_format,
            )

    # ------------------------------------------------------------------------------------------------ data
    def build_collator(self, tokenizer: Any, args: QwenTrainerConfig) -> RetrievalCollator:
        collator = super().build_collator(tokenizer, args)
        collator.append_eos_token_id = self._eos_token_id  # truncate, then append: the pooled EOS always survives
        return collator

    def get_train_dataloader(self) -> DataLoader:
        if self.curriculum is not None:
            return self.curriculum.build_dataloader()
        return super().get_train_dataloader()

    # ------------------------------------------------------------------------------------------------ loss
    def apply_loss_overrides(self, overrides: dict[str, Any]) -> None:
        """Loss options for the coming steps: the config's, updated with `overrides` (a curriculum stage's)."""
        self.loss_options = {**self.args.loss_options, **overrides}

    def check_stage_options(self, overrides: dict[str, Any], train_group_size: int, where: str) -> None:
        check_loss_options(
            {**self.args.loss_options, **overrides},
            train_group_size=train_group_size,
            negatives_cross_device=self.args.negatives_cross_device,
            where=where,
        )

    def compute_retrieval_loss(
        self, model: nn.Module, outputs: Any, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, docs = outputs.query.dense, outputs.passages.dense
        group_size = docs.shape[0] // query.shape[0]
        options = self.loss_options
        in_batch = options["in_batch_negatives"]
        hashes = inputs.get("passage_hashes")
        loss_kwargs = {
            "temperature": options["temperature"],
            "margin": options["false_negative_margin"],
            "use_qq": in_batch and options["use_qq"],
            "use_dd": in_batch and options["use_dd"],
            "use_inbatch_qd": in_batch and options["use_inbatch_qd"],
            "mask_false_negatives": options["mask_false_negatives"],
            "doc_hashes": hashes.to(docs.device) if hashes is not None else None,
            "cross_device": in_batch and self.args.negatives_cross_device,
        }
        dims = self.args.matryoshka_dims
        if not dims:
            loss, stats = qwen3_infonce_loss(
                F.normalize(query, dim=-1), F.normalize(docs, dim=-1), group_size, **loss_kwargs
            )
            return loss, {"masked_negatives": stats["masked"], "negatives": stats["candidates"]}
        components: dict[str, torch.Tensor] = {}
        total = query.new_zeros(())
        largest = max(dims)
        for dim, weight in zip(dims, self.args.matryoshka_weights):
            loss_dim, stats = qwen3_infonce_loss(
                truncate_embeddings(query, dim), truncate_embeddings(docs, dim), group_size, **loss_kwargs
            )
            total = total + weight * loss_dim
            components[f"loss_dim_{dim}"] = loss_dim.detach()
            if dim == largest:
                components["masked_negatives"] = stats["masked"]
                components["negatives"] = stats["candidates"]
        return total, components

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.curriculum is not None and "loss" in logs:
            self.curriculum.annotate_logs(logs, self.state.global_step)
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ save
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(
            output_dir,
            merge_lora=self.args.merge_lora_on_save,
            state_dict=state_dict,
            # sentence-transformers truncates every text to this; training never saw longer texts
            max_seq_length=max(self.args.query_max_len, self.args.passage_max_len),
            query_instruction=self.args.query_instruction,
        )
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_callback_state(self) -> None:
        # With restore_callback_states_from_checkpoint the Trainer rebuilds stateful callbacks from their saved
        # arguments; the curriculum's state is a function of the global step, so keep the bound instance.
        super()._load_callback_state()
        if self.curriculum is not None:
            self.callback_handler.remove_callback(CurriculumCallback)
            self.callback_handler.add_callback(self.curriculum)


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
    evaluator: IREvaluator | Sequence[IREvaluator] | None = None,
    callbacks: list[TrainerCallback] | None = None,
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
        train_dataset, evaluator, callbacks: passed to `QwenTrainer`.
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
    return QwenTrainer(model=model, args=config, train_dataset=train_dataset, evaluator=evaluator, callbacks=callbacks)
