"""`BaseRetrieverTrainer`: the `transformers.Trainer` subclass that every ark_hf trainer builds on.

It owns what all retrievers share: the group dataset and collator, the batch sampler choice, loss
component logging, the IR evaluator, saving through the model's own `save_pretrained`, and the refusal
to write into another run's output directory. Subclasses only say how model outputs become a loss
(`compute_retrieval_loss`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.utils import logging

from ark_hf.data.collator import RetrievalCollator
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.data.samplers import (
    LengthGroupedBatchSampler,
    NoDuplicatesBatchSampler,
    RetrievalBatchSampler,
    SameSourceBatchSampler,
)
from ark_hf.evaluation.ir import IREvaluator
from ark_hf.hub import write_model_card

logger = logging.get_logger(__name__)

__all__ = ["BaseRetrieverTrainer", "OutputDirError", "NonFiniteLossError"]

TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
TMP_PREFIX = ".tmp-"


def fsync_tree(path: str) -> None:
    """Flush every file and folder under `path` to disk (so a rename publishes complete files)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class OutputDirError(FileExistsError):
    """The output directory holds another run and the caller did not allow overwriting it."""


class NonFiniteLossError(FloatingPointError):
    """A loss or loss component became NaN or infinite."""


class _SkipBatch(Exception):
    """Raised inside `compute_loss` under `nan_policy='skip'`; `training_step` drops the batch."""


def check_output_dir(
    output_dir: str, *, overwrite: bool, resume_from_checkpoint: Any = None, required_bytes: int = 0
) -> None:
    """Refuse a non-empty `output_dir` unless overwriting or resuming was asked for; check it is writable and
    that its file system has `required_bytes` free (one checkpoint).

    Runs before anything is written, so a mistyped path never clobbers a finished model and a full disk
    fails now rather than at the first save, hours in.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {output_dir} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not resume_from_checkpoint:
        entries = sorted(p.name for p in path.iterdir())[:5]
        raise OutputDirError(
            f"output_dir {output_dir} is not empty (holds {', '.join(entries)}{', ...' if len(entries) == 5 else ''}); "
            "pass overwrite_output_dir=True (--overwrite_output_dir) to write into it, or "
            "resume_from_checkpoint to continue that run"
        )
    probe = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise OutputDirError(f"output_dir {output_dir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise OutputDirError(f"output_dir {output_dir}: {probe} is not writable")
    free = shutil.disk_usage(probe).free
    if required_bytes and free < required_bytes:
        raise OutputDirError(
            f"output_dir {output_dir}: {free / 2**30:.2f} GiB free on its file system, but one checkpoint needs "
            f"about {required_bytes / 2**30:.2f} GiB"
        )


def checkpoint_bytes(model: nn.Module, args: TrainingArguments) -> int:
    """Rough size of one checkpoint: weights, plus AdamW's two moments unless only the model is saved."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + (0 if args.save_only_model else 8 * trainable)


def check_lengths_and_vocab(model: nn.Module, tokenizer: Any, args: TrainingArguments) -> None:
    """Max lengths within the model's position limit and a tokenizer that fits the embedding matrix."""
    config = getattr(model, "config", None)
    if config is None:
        return
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= config.pad_token_id + 1  # RoBERTa-style positions start after the padding index
    for name in ("query_max_len", "passage_max_len"):
        value = getattr(args, name, None)
        if limit is not None and value is not None and value > limit:
            raise ValueError(f"{name}={value} exceeds the model's position limit of {limit} tokens")
    vocab = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has {vocab} rows: "
            "tokenizer and model do not belong together"
        )


class BaseRetrieverTrainer(Trainer):
    """A `Trainer` for embedding models trained on (query, positive, negatives) groups.

    Args:
        model: an ark_hf model (`BGEM3Model`, `DecoderEmbedder`) whose forward takes `query` and `passages`
            features and returns a `RetrieverOutput`.
        args: the config (a `RetrieverConfig` subclass). `config=` is accepted as an alias.
        train_dataset: a `TrainGroupDataset`, or records (list of dicts / `datasets.Dataset`), which are
            validated and wrapped; `None` loads `args.train_data`.
        processing_class: the tokenizer (`tokenizer=` is accepted as an alias); defaults to `model.tokenizer`.
        evaluator: an `IREvaluator` (or a list) run at each evaluation; `None` builds one from `args.eval_data`.
        data_collator: defaults to a `RetrievalCollator` with the config's lengths.
    """

    _tag_names = ["ark_hf"]

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Callable | None = None,
        evaluator: IREvaluator | Sequence[IREvaluator] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        *,
        config: TrainingArguments | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is not None and config is not None and args is not config:
            raise ValueError("pass the configuration once: `args=` or `config=`, not both")
        args = args if args is not None else config
        if args is None:
            raise ValueError(f"{type(self).__name__} needs a config (`args=` or `config=`)")
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError("pass the tokenizer once: `processing_class=` or `tokenizer=`, not both")
        processing_class = processing_class if processing_class is not None else tokenizer
        if processing_class is None:
            processing_class = getattr(model, "tokenizer", None)

        if train_dataset is None and getattr(args, "train_data", None):
            train_dataset = self.load_records(args.train_data, args)
        if train_dataset is not None and not isinstance(train_dataset, TrainGroupDataset):
            if isinstance(train_dataset, list) and train_dataset and isinstance(train_dataset[0], dict):
                if "source_index" not in train_dataset[0]:  # in-memory records: validate like a file
                    import datasets

                    train_dataset = self.load_records(datasets.Dataset.from_list(train_dataset), args)
            else:
                train_dataset = self.load_records(train_dataset, args)
            train_dataset = self.build_group_dataset(train_dataset, args)
        if evaluator is None and getattr(args, "eval_data", None):
            evaluator = self.build_evaluator(args)
        self.evaluators: list[IREvaluator] = (
            [] if evaluator is None else list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]
        )
        if data_collator is None:
            data_collator = self.build_collator(processing_class, args)
        check_lengths_and_vocab(model, processing_class, args)

        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset if eval_dataset is not None or not self.evaluators else "evaluator",
            processing_class=processing_class,
            data_collator=data_collator,
            callbacks=callbacks,
            **kwargs,
        )
        if self.eval_dataset == "evaluator":
            self.eval_dataset = None
        self._component_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._component_counts: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def load_records(sources: Any, args: TrainingArguments, require_teacher_scores: bool = False) -> list[dict]:
        from ark_hf.data.loading import load_training_records

        return load_training_records(
            sources,
            require_teacher_scores=require_teacher_scores,
            max_errors=getattr(args, "max_validation_errors", 20),
        )

    def build_group_dataset(self, records: list[dict], args: TrainingArguments) -> TrainGroupDataset:
        return TrainGroupDataset(
            records,
            train_group_size=args.train_group_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            query_instruction=args.query_instruction,
            query_instruction_format=args.query_instruction_format,
            dataset_instructions=args.dataset_instructions,
            passage_instruction=args.passage_instruction,
            passage_instruction_format=args.passage_instruction_format,
            use_teacher_scores=self.uses_teacher_scores(args),
        )

    def uses_teacher_scores(self, args: TrainingArguments) -> bool:
        return False

    def build_collator(self, tokenizer: Any, args: TrainingArguments) -> RetrievalCollator:
        return RetrievalCollator(
            tokenizer=tokenizer,
            query_max_len=args.query_max_len,
            passage_max_len=args.passage_max_len,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def build_evaluator(self, args: TrainingArguments) -> IREvaluator:
        from ark_hf.evaluation.ir import load_ir_data

        path = args.eval_data
        if str(path).endswith(".json"):
            queries, corpus, qrels = load_ir_data(path)
        else:
            from ark_hf.data.loading import load_training_records, records_to_ir

            queries, corpus, qrels = records_to_ir(load_training_records(path))
        return IREvaluator(
            queries,
            corpus,
            qrels,
            modes=args.eval_modes,
            weights=tuple(getattr(args, "eval_mode_weights", (1.0, 0.3, 1.0))),
            query_instruction=args.query_instruction,
            query_instruction_format=args.query_instruction_format,
            query_max_len=args.query_max_len,
            passage_max_len=args.passage_max_len,
            batch_size=args.eval_batch_size_encode,
            rerank_top_k=getattr(args, "eval_rerank_top_k", None),
        )

    def build_batch_sampler(self, dataset: TrainGroupDataset) -> RetrievalBatchSampler:
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        common = {"seed": seed, "drop_last": args.dataloader_drop_last}
        batch_size = self._train_batch_size
        if getattr(args, "same_dataset_within_batch", False):
            return SameSourceBatchSampler(dataset.source_indices(), batch_size, **common)
        if getattr(args, "no_duplicates_in_batch", False):
            texts = [[r["query"], *r["pos"]] for r in dataset.records]
            return NoDuplicatesBatchSampler(texts, batch_size, **common)
        if getattr(args, "train_sampling_strategy", "random") == "group_by_length":
            lengths = [len(r["query"]) + max(len(p) for p in r["pos"]) for r in dataset.records]
            return LengthGroupedBatchSampler(lengths, batch_size, **common)
        return RetrievalBatchSampler(len(dataset), batch_size, **common)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("training requires a train_dataset (or config.train_data)")
        dataset = self.train_dataset
        if not isinstance(dataset, TrainGroupDataset):
            return super().get_train_dataloader()
        dataloader = DataLoader(
            dataset,
            batch_sampler=self.build_batch_sampler(dataset),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=False,  # workers must see each epoch's set_epoch
            prefetch_factor=self.args.dataloader_prefetch_factor if self.args.dataloader_num_workers > 0 else None,
        )
        return self.accelerator.prepare(dataloader)

    # ------------------------------------------------------------------------------------------------ loss
    def compute_retrieval_loss(
        self, model: nn.Module, outputs: Any, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Turn the model's outputs into `(loss, components)`; subclasses implement it."""
        raise NotImplementedError

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = model(query=inputs["query"], passages=inputs["passages"])
        loss, components = self.compute_retrieval_loss(model, outputs, inputs)
        self.check_finite(loss, components, inputs)
        if model.training:
            for name, value in components.items():  # summed on the device: no host sync per step
                self._component_sums[name] = self._component_sums[name] + torch.as_tensor(value).detach().float()
                self._component_counts[name] += 1
        return (loss, outputs) if return_outputs else loss

    def check_finite(self, loss: torch.Tensor, components: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        """Stop (or skip the batch) at a NaN/inf, naming the step, the component and the records of the batch."""
        values = {"loss": loss.detach(), **components}
        finite = torch.stack(
            [torch.as_tensor(v, device=loss.device).detach().float().reshape(()) for v in values.values()]
        )
        all_finite = bool(torch.isfinite(finite).all())  # one host sync for every component together
        bad = [] if all_finite else [name for name, value in values.items() if not math.isfinite(float(value))]
        skip = getattr(self.args, "nan_policy", "stop") == "skip" and self.model.training
        if skip and self.accelerator.num_processes > 1:
            # every process must drop the same step, or the gradient all-reduce would wait forever
            flag = torch.tensor(float(bool(bad)), device=self.args.device)
            if float(self.accelerator.reduce(flag, reduction="sum")) > 0 and not bad:
                raise _SkipBatch("another process saw a non-finite loss")
        if not bad:
            return
        ids = inputs.get("record_ids") or []
        shown = ", ".join(str(i) for i in ids[:20]) + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
        message = (
            f"non-finite loss at step {self.state.global_step + 1}: component(s) {', '.join(bad)} = "
            f"{', '.join(str(float(values[b])) for b in bad)}; records in the batch: {shown}"
        )
        if skip:
            logger.warning("%s; batch skipped (nan_policy='skip')", message)
            raise _SkipBatch(message)
        raise NonFiniteLossError(message)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except _SkipBatch:
            self._component_sums["skipped_batches"] += 1.0
            self._component_counts["skipped_batches"] = 1  # logged as a count per logging window
            return torch.zeros((), device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_counts:
            for name, total in self._component_sums.items():
                mean = torch.as_tensor(total, dtype=torch.float32) / max(self._component_counts[name], 1)
                value = mean.to(self.args.device)
                logs[name] = round(float(self.accelerator.reduce(value, reduction="mean")), 6)
            self._component_sums.clear()
            self._component_counts.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            metrics.update(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))
        if self.evaluators:
            model = self.accelerator.unwrap_model(self.model)
            for evaluator in self.evaluators:
                for key, value in evaluator(model).items():
                    metrics[f"{metric_key_prefix}_{key}"] = value
            metrics["epoch"] = self.state.epoch
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_retrieval_metrics(self, metrics: dict[str, Any], filename: str = "retrieval_metrics.json") -> None:
        """Write evaluation results (e.g. `{"before": ..., "after": ...}`) as JSON into `output_dir`, once."""
        if self.is_world_process_zero() and metrics:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, filename), "w", encoding="utf-8") as handle:
                json.dump(metrics, handle, indent=2)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------ save / load
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if self.args.should_save:
            check_output_dir(
                self.args.output_dir,
                overwrite=getattr(self.args, "overwrite_output_dir", False),
                resume_from_checkpoint=resume_from_checkpoint,
                required_bytes=checkpoint_bytes(self.model, self.args),
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_kwargs: dict[str, Any] = {}
        if state_dict is not None:
            save_kwargs["state_dict"] = state_dict
        model.save_pretrained(output_dir, **save_kwargs)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the final model: written complete into `.tmp-model`, fsynced, then each file renamed into place.

        No file in `output_dir` is ever half-written; a process killed before the renames leaves the previous
        files untouched (checkpoints take the same care in `_save_checkpoint`).
        """
        if _internal_call:  # a checkpoint: `_save_checkpoint` already writes into a temporary folder
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tmp_dir = os.path.join(output_dir, TMP_PREFIX + "model")
        if self.args.should_save and os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
        self.accelerator.wait_for_everyone()
        super().save_model(tmp_dir, _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            fsync_tree(tmp_dir)
            for entry in sorted(os.listdir(tmp_dir)):
                target = os.path.join(output_dir, entry)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(tmp_dir, entry), target)
            os.rmdir(tmp_dir)
            fsync_dir(output_dir)
            write_model_card(self, output_dir)  # README.md (and the training plot) of the final model
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save")

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write the checkpoint into `.tmp-checkpoint-N`, fsync, then rename it to `checkpoint-N`.

        A process killed mid-save leaves only a `.tmp-` folder (ignored by resume and removed at the next
        save), so the previous checkpoint stays the latest complete one; rotation (`save_total_limit`) runs
        only after the new checkpoint is in place, so it never removes the only good checkpoint.
        """
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        tmp_dir = os.path.join(run_dir, TMP_PREFIX + name)
        if self.args.should_save:
            for stale in (
                Path(run_dir).glob(f"{TMP_PREFIX}{PREFIX_CHECKPOINT_DIR}-*") if os.path.isdir(run_dir) else []
            ):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.save_model(tmp_dir, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(tmp_dir)
            self._save_scaler(tmp_dir)
            self._save_rng_state(tmp_dir)
        best_strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy in best_strategies and self.state.best_global_step:
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best_dir):
                self.state.best_model_checkpoint = best_dir
        if self.args.should_save:
            exportable = [
                c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)
            ]
            for callback in exportable:
                callback_name = callback.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(callback_name), list):
                    self.state.stateful_callbacks[callback_name].append(callback.state())
                else:
                    self.state.stateful_callbacks[callback_name] = callback.state()
            self.state.save_to_json(os.path.join(tmp_dir, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            fsync_tree(tmp_dir)
            if os.path.isdir(final_dir):
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
            fsync_dir(run_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        self.accelerator.unwrap_model(self.model).load_weights_from(best)
