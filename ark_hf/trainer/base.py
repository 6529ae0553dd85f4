"""`BaseRetrieverTrainer`: the `transformers.Trainer` subclass that every ark_hf trainer builds on.

It owns what all retrievers share: reading and validating the data before the model loads, the group dataset
and collator, the batch sampler choice, the curriculum stream, the loss (`loss=`, a `RetrievalLoss`) and the
logging of its components, the NaN guard, the evaluators, atomic saving (`AtomicSaveMixin`), and the refusal
to write into another run's output directory.

Extension points (each a method a subclass or a user overrides): `build_model(args)`, `build_loss(args)`,
`prepare_model(model, args)`, `build_collator`, `build_batch_sampler`, `build_group_dataset`,
`retrieval_batch(inputs, outputs)`, `forward_batch(model, inputs)`, `save_pretrained_kwargs()`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging

from ark_hf.callbacks.curriculum import CurriculumCallback
from ark_hf.callbacks.hard_negatives import HardNegativeRefresh
from ark_hf.curriculum.stream import CurriculumStream
from ark_hf.data.collator import RetrievalCollator
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.data.samplers import (
    LengthGroupedBatchSampler,
    NoDuplicatesBatchSampler,
    RetrievalBatchSampler,
    SameSourceBatchSampler,
)
from ark_hf.data.schema import DataValidationError
from ark_hf.data.token_budget import TokenBudgetBatchSampler, group_token_bounds
from ark_hf.evaluation.base import Evaluator
from ark_hf.losses.base import LossOutput, RetrievalBatch, RetrievalLoss
from ark_hf.losses.cached import GradCache
from ark_hf.models.kernels import apply_kernel_switches
from ark_hf.models.outputs import RetrieverOutput
from ark_hf.trainer.atomic_save import TRAINING_ARGS_NAME, AtomicSaveMixin
from ark_hf.trainer.base_config import RetrieverConfig
from ark_hf.trainer.engines import backward_hooks
from ark_hf.utils import preflight
from ark_hf.utils.preflight import (
    NonFiniteLossError,
    OutputDirError,
    check_lengths_and_vocab,
    check_output_dir,
)

logger = logging.get_logger(__name__)

__all__ = ["TRAINING_ARGS_NAME", "BaseRetrieverTrainer", "NonFiniteLossError", "OutputDirError", "check_output_dir"]


class _SkipBatch(Exception):
    """Raised inside `compute_loss` under `nan_policy='skip'`; `training_step` drops the batch."""


class BaseRetrieverTrainer(AtomicSaveMixin, Trainer):
    """A `Trainer` for embedding models trained on (query, positive, negatives) groups.

    Each step: `forward_batch` embeds the batch's queries and passage groups (one model call), `retrieval_batch`
    collects what the loss may need besides embeddings (group size, hashes, teacher scores), the loss returns
    `LossOutput(loss, components)`, and `finish_loss` applies the NaN guard and accumulates the components,
    which are logged with the Trainer's `loss` (`loss_dense`, `loss_lex`, `masked_negatives`, ...).

    Args:
        model: an ark_hf model (`BGEM3Model`, `DecoderEmbedder`) whose forward takes `query` and `passages`
            features and returns a `RetrieverOutput`; `None` builds it from the config (`build_model`), after
            the data has been read and validated.
        args: the config (an instance of the trainer's `config_class`). `config=` is accepted as an alias.
        train_dataset: a `TrainGroupDataset`, or records (list of dicts / `datasets.Dataset`), which are
            validated and wrapped; `None` loads `args.train_data` (or the stages of `args.curriculum`).
        processing_class: the tokenizer (`tokenizer=` is accepted as an alias); defaults to `model.tokenizer`.
        evaluator: an `Evaluator` (or a list), e.g. `IREvaluator`, run at each evaluation; `None` builds one
            from `args.eval_data`.
        data_collator: defaults to a `RetrievalCollator` with the config's lengths.
        callbacks: Trainer callbacks; a `CurriculumCallback` here (or `args.curriculum`) runs a stage plan.
        loss: a `RetrievalLoss`; default `build_loss(args)`, the trainer's published objective.
    """

    _tag_names = ["ark_hf"]
    config_class: ClassVar[type[TrainingArguments]] = RetrieverConfig

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Callable | None = None,
        evaluator: Evaluator | Sequence[Evaluator] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        *,
        loss: RetrievalLoss | None = None,
        config: TrainingArguments | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        args = self._one_of(args, config, "the configuration", "`args=` or `config=`")
        if args is None:
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__} (`args=` or `config=`)")
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(args).__name__}")
        processing_class = self._one_of(
            processing_class, tokenizer, "the tokenizer", "`processing_class=` or `tokenizer=`"
        )
        callbacks = list(callbacks or [])

        # Everything that reads user files runs before the model loads: a bad record fails in seconds.
        self.curriculum = self._resolve_curriculum(args, callbacks)
        stage_records = None
        if self.curriculum is not None:
            if train_dataset is not None or args.train_data:
                raise ValueError("a curriculum names its own data: pass no train_dataset / train_data with it")
            stage_records = self._load_stage_records(self.curriculum, args)
        else:
            train_dataset = self._validated_records(train_dataset, args)
            if isinstance(train_dataset, list):  # settings that name files, and groups, checked before weights load
                from ark_hf.data.checks import check_group_feasibility

                preflight.check_dataset_instructions(train_dataset, args.dataset_instructions)
                check_group_feasibility(
                    train_dataset, args.train_group_size, use_teacher_scores=self.uses_teacher_scores(args)
                )
        self.negative_refresh = self._resolve_negative_refresh(args, callbacks)
        if self.negative_refresh is not None:  # its corpus and teacher are checked before the weights load
            records = train_dataset.records if isinstance(train_dataset, TrainGroupDataset) else train_dataset
            self.negative_refresh.check_before_training(records or [], args, trust_remote_code=args.trust_remote_code)
        if evaluator is None and args.eval_data:
            evaluator = self.build_evaluator(args)
        self.evaluators: list[Evaluator] = (
            [] if evaluator is None else list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]
        )
        self.loss = loss if loss is not None else self.build_loss(args)
        if not isinstance(self.loss, RetrievalLoss):
            raise TypeError(
                f"loss must be a RetrievalLoss (ark_hf.losses.base), got {type(self.loss).__name__}: its forward takes "
                "(query, passages, batch, step) embeddings and returns LossOutput(loss, components)"
            )

        if model is None and args.padding_free == "true" and args.model_name_or_path:
            self._refuse_unpackable(args)
        if model is None:  # seeded: fresh weights (LoRA, new heads) are the same in every run and on every rank
            set_seed(args.seed)
            model = self.build_model(args)
        model = self.prepare_model(model, args)
        # the loss is the one authority on what the model computes in training (`RetrievalLoss.heads`)
        model.set_training_outputs(self.loss.heads)
        # the config's speed switches reach every model this one way, whether the config built it or the user did
        apply_kernel_switches(model, args)
        if processing_class is None:
            processing_class = getattr(model, "tokenizer", None)
        if train_dataset is not None and not isinstance(train_dataset, TrainGroupDataset):
            train_dataset = self.build_group_dataset(train_dataset, args)
        if data_collator is None:
            data_collator = self.build_collator(processing_class, args, model)
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
        # inside a training step: its NaN guards, read after its backward (see `finish_loss`); None: read at once
        self._deferred_finite_checks: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]] | None = None
        self._component_counts: dict[str, int] = defaultdict(int)
        self.curriculum_stream: CurriculumStream | None = None
        if self.curriculum is not None:
            self._bind_curriculum(stage_records)
        if self.negative_refresh is not None:
            self.negative_refresh.bind(self)
        self.grad_cache = GradCache(args.mini_batch_size) if args.mini_batch_size else None
        if self.grad_cache is not None and args.n_gpu > 1:  # DDP, DeepSpeed and FSDP: ark_hf/trainer/engines.py
            raise ValueError(
                f"mini_batch_size (GradCache) does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one "
                "process): launch one process per GPU with accelerate_configs/multi_gpu.yaml (DDP), "
                "deepspeed_zero2.yaml, deepspeed_zero3.yaml or fsdp.yaml, or unset mini_batch_size"
            )

    @staticmethod
    def _refuse_unpackable(args: TrainingArguments) -> None:
        """`padding_free: true` on a backbone that cannot pack fails here, from its config, before weights load."""
        from ark_hf.models.packing import padding_free_unsupported_before_load

        try:
            reason = padding_free_unsupported_before_load(
                args.model_name_or_path,
                attn_implementation=getattr(args, "attn_implementation", None),
                trust_remote_code=args.trust_remote_code,
            )
        except (OSError, ValueError):  # no readable config: the model's own loading reports that
            return
        if reason is not None:
            raise ValueError(
                f"padding_free=true: {args.model_name_or_path} cannot run padding-free: {reason}; "
                "set padding_free: auto (packs where it can) or false"
            )

    @staticmethod
    def _one_of(first: Any, second: Any, what: str, spellings: str) -> Any:
        if first is not None and second is not None and first is not second:
            raise ValueError(f"pass {what} once: {spellings}, not both")
        return first if first is not None else second

    # ------------------------------------------------------------------------------------------------ hooks
    def build_model(self, args: TrainingArguments) -> nn.Module:
        """The model the config describes (called only when `model=None`)."""
        raise ValueError(f"{type(self).__name__} needs a model (pass model=...)")

    def build_loss(self, args: TrainingArguments) -> RetrievalLoss:
        """The trainer's default objective, built from the config (used when `loss=None`)."""
        raise ValueError(f"{type(self).__name__} needs a loss (pass loss=RetrievalLoss(...))")

    def prepare_model(self, model: nn.Module, args: TrainingArguments) -> nn.Module:
        """Check and adjust a model against the config before training (freezing, head switches)."""
        return model

    @staticmethod
    def uses_teacher_scores(args: TrainingArguments) -> bool:
        """Whether records must carry `pos_scores`/`neg_scores` (distillation from precomputed scores)."""
        return False

    # ------------------------------------------------------------------------------------------------ data
    def load_records(self, sources: Any, args: TrainingArguments) -> list[dict]:
        from ark_hf.data.loading import load_training_records

        return load_training_records(
            sources, require_teacher_scores=self.uses_teacher_scores(args), max_errors=args.max_validation_errors
        )

    def _validated_records(self, train_dataset: Any, args: TrainingArguments) -> Any:
        """Read and validate the training data now, before the model loads."""
        if train_dataset is None:
            return self.load_records(args.train_data, args) if args.train_data else None
        if isinstance(train_dataset, TrainGroupDataset):
            return train_dataset
        if isinstance(train_dataset, list) and train_dataset and isinstance(train_dataset[0], dict):
            if "source_index" in train_dataset[0]:  # records that went through load_training_records
                return train_dataset
            import datasets

            train_dataset = datasets.Dataset.from_list(train_dataset)
        return self.load_records(train_dataset, args)

    def build_group_dataset(
        self,
        records: list[dict],
        args: TrainingArguments,
        *,
        train_group_size: int | None = None,
        seed: int | None = None,
        query_instruction: str | None = None,
    ) -> TrainGroupDataset:
        """Groups (query, positive, negatives) of the records; a curriculum stage may override size, seed, instruction."""
        return TrainGroupDataset(
            records,
            train_group_size=train_group_size or args.train_group_size,
            seed=seed if seed is not None else args.data_seed if args.data_seed is not None else args.seed,
            query_instruction=query_instruction if query_instruction is not None else args.query_instruction,
            query_instruction_format=args.query_instruction_format,
            dataset_instructions=args.dataset_instructions,
            passage_instruction=args.passage_instruction,
            passage_instruction_format=args.passage_instruction_format,
            use_teacher_scores=self.uses_teacher_scores(args),
        )

    def build_collator(
        self, tokenizer: Any, args: TrainingArguments, model: nn.Module | None = None
    ) -> RetrievalCollator:
        return RetrievalCollator(
            tokenizer=tokenizer,
            # the model's tokenization rule (`model.tokenize` uses the same): decoders append their EOS
            text_tokenizer=model.text_tokenizer(tokenizer) if hasattr(model, "text_tokenizer") else None,
            query_max_len=args.query_max_len,
            passage_max_len=args.passage_max_len,
            pad_to_multiple_of=args.pad_to_multiple_of,
            # padding-free steps get their packing index from the data loader, not from the device
            packing_index=bool(getattr(model, "padding_free", False)),
        )

    def build_evaluator(self, args: TrainingArguments) -> Evaluator:
        from ark_hf.evaluation.data import load_eval_set
        from ark_hf.evaluation.ir import IREvaluator

        queries, corpus, qrels = load_eval_set(args.eval_data)
        return IREvaluator(
            queries,
            corpus,
            qrels,
            modes=args.eval_modes,
            weights=tuple(args.eval_mode_weights),
            query_instruction=args.query_instruction,
            query_instruction_format=args.query_instruction_format,
            query_max_len=args.query_max_len,
            passage_max_len=args.passage_max_len,
            batch_size=args.eval_batch_size_encode,
            rerank_top_k=args.eval_rerank_top_k,
        )

    def build_batch_sampler(self, dataset: TrainGroupDataset) -> RetrievalBatchSampler:
        """The batch sampler the config asks for.

        `max_tokens_per_batch` batches by token budget (`TokenBudgetBatchSampler`): as many groups as fit, each
        counted as the upper bound of its query + `train_group_size` passages in tokens as the collator makes
        them; with `train_sampling_strategy="group_by_length"` the budget's batches hold groups of similar size.
        `group_by_length` alone sorts mega-batches by the same whole-group token bound (query, positive and the
        negatives the group can draw), not by query + positive only. A budget smaller than a record's group is
        refused here, before the first step, naming the record's source.
        """
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        common = {"seed": seed, "drop_last": args.dataloader_drop_last}
        batch_size = self._train_batch_size
        if args.same_dataset_within_batch:
            return SameSourceBatchSampler(dataset.source_indices(), batch_size, **common)
        if args.no_duplicates_in_batch:
            texts = [[r["query"], *r["pos"]] for r in dataset.records]
            return NoDuplicatesBatchSampler(texts, batch_size, **common)
        by_length = args.train_sampling_strategy == "group_by_length"
        if not (by_length or args.max_tokens_per_batch):
            return RetrievalBatchSampler(len(dataset), batch_size, **common)

        collator = self.data_collator

        def count_tokens(texts: list[str], max_length: int) -> list[int]:
            counts: list[int] = []
            for start in range(0, len(texts), 512):
                chunk = texts[start : start + 512]
                if isinstance(collator, RetrievalCollator):
                    encoded = collator._tokenize(chunk, max_length)  # exactly the batches' tokenization
                    mask = encoded["attention_mask"]
                    counts.extend(int(n) for n in torch.as_tensor(mask).sum(-1).tolist())
                else:
                    ids = self.processing_class(chunk, truncation=True, max_length=max_length)["input_ids"]
                    counts.extend(len(row) for row in ids)
            return counts

        bounds = group_token_bounds(
            dataset, count_tokens, query_max_len=args.query_max_len, passage_max_len=args.passage_max_len
        )
        if not args.max_tokens_per_batch:
            return LengthGroupedBatchSampler(bounds, batch_size, **common)
        largest = max(range(len(bounds)), key=bounds.__getitem__)
        if args.max_tokens_per_batch < bounds[largest]:
            record = dataset.records[largest]
            where = (
                f"{record['source']}, line {record['line']}"
                if "source" in record and "line" in record
                else (f"record {largest}")
            )
            raise ValueError(
                f"max_tokens_per_batch={args.max_tokens_per_batch} is smaller than the training group of {where}: "
                f"{bounds[largest]} tokens (query + {dataset.train_group_size} passages, truncated to "
                f"query_max_len={args.query_max_len} / passage_max_len={args.passage_max_len}); raise "
                "max_tokens_per_batch or lower train_group_size / passage_max_len"
            )
        return TokenBudgetBatchSampler(
            bounds,
            args.max_tokens_per_batch,
            mega_batch_size=50 * batch_size if by_length else 0,
            **common,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.curriculum_stream is not None:
            return self.curriculum_stream.dataloader(self.data_collator, self.accelerator.prepare)
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

    # ------------------------------------------------------------------------------------------------ curriculum
    @staticmethod
    def _resolve_curriculum(args: TrainingArguments, callbacks: list[TrainerCallback]) -> CurriculumCallback | None:
        given = [callback for callback in callbacks if isinstance(callback, CurriculumCallback)]
        if len(given) > 1:
            raise ValueError("pass at most one CurriculumCallback")
        if args.curriculum:
            if given:
                raise ValueError("config.curriculum is set and a CurriculumCallback is passed too; keep one plan")
            callback = CurriculumCallback.from_yaml(args.curriculum)
            callbacks.append(callback)
            return callback
        return given[0] if given else None

    @staticmethod
    def _resolve_negative_refresh(
        args: TrainingArguments, callbacks: list[TrainerCallback]
    ) -> HardNegativeRefresh | None:
        """The `HardNegativeRefresh` of `config.refresh_negatives` or of `callbacks` (at most one)."""
        given = [callback for callback in callbacks if isinstance(callback, HardNegativeRefresh)]
        from_config = HardNegativeRefresh.from_config(args)
        if len(given) + (from_config is not None) > 1:
            raise ValueError("pass one HardNegativeRefresh: config.refresh_negatives or callbacks=[...], not both")
        if from_config is not None:
            callbacks.append(from_config)
            return from_config
        return given[0] if given else None

    def _load_stage_records(self, curriculum: CurriculumCallback, args: TrainingArguments) -> list[list[dict]]:
        """Every data stage's records, validated; all stages' problems are reported together."""
        issues, records = [], []
        for stage in curriculum.stages:
            if stage.is_merge:
                records.append([])
                continue
            try:
                records.append(self.load_records(list(stage.datasets), args))
            except DataValidationError as error:
                issues.extend(error.issues)
                records.append([])
        if issues:
            raise DataValidationError(issues, max_shown=None)
        from ark_hf.data.checks import check_group_feasibility, check_name_keyed_settings

        check_name_keyed_settings(
            args, sorted({str(r.get("source")) for stage in records for r in stage}), where="the curriculum's stages"
        )
        for stage, stage_records in zip(curriculum.stages, records):
            if not stage.is_merge:
                check_group_feasibility(
                    stage_records,
                    stage.train_group_size or args.train_group_size,
                    use_teacher_scores=self.uses_teacher_scores(args),
                    where=f"stage '{stage.name}'",
                )
        return records

    def _bind_curriculum(self, stage_records: list[list[dict]]) -> None:
        """Size the stages, set `max_steps` to the plan's length, and hand the callback what it adjusts."""
        stream = CurriculumStream(
            self.curriculum.plan,
            stage_records,
            self.args,
            batch_size=self._train_batch_size,
            build_dataset=self.build_group_dataset,
            build_sampler=self.build_batch_sampler,
            check_stage_options=self.loss.check_stage_options,
        )
        self.args.max_steps = stream.plan.total_steps
        self.curriculum_stream = stream
        self.train_dataset = stream.dataset()
        self.curriculum.bind(
            loss=self.loss,
            fingerprint=stream.fingerprint,
            output_dir=self.args.output_dir,
            accelerator=self.accelerator,
            should_save=self.args.should_save,
        )
        logger.info(stream.describe())

    # ------------------------------------------------------------------------------------------------ loss
    def forward_batch(self, model: nn.Module, inputs: dict[str, Any]) -> RetrieverOutput:
        """One model call over the batch's queries and passage groups."""
        return model(query=inputs["query"], passages=inputs["passages"])

    def retrieval_batch(self, inputs: dict[str, Any], outputs: RetrieverOutput) -> RetrievalBatch:
        """The batch facts the loss may use (group size, hashes, record ids, teacher scores)."""
        n_queries = outputs.query.dense.size(0)
        return RetrievalBatch.from_inputs(
            inputs, outputs.passages.dense.size(0) // n_queries, device=outputs.query.dense.device
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = self.forward_batch(model, inputs)
        output = self.loss(
            outputs.query, outputs.passages, self.retrieval_batch(inputs, outputs), self.state.global_step
        )
        loss = self.finish_loss(output, inputs, training=model.training)
        return (loss, outputs) if return_outputs else loss

    def finish_loss(self, output: LossOutput, inputs: dict[str, Any], training: bool = True) -> torch.Tensor:
        """NaN guard and component bookkeeping shared by every way of computing a loss (plain, cached).

        In a training step with `nan_policy='stop'` the guard is read after the backward, where the Trainer reads
        the step's loss anyway: a read between forward and backward would stall the device's queue once more per
        step. The optimizer has not stepped by then, so a non-finite loss still stops before touching a weight.
        """
        if training and self._deferred_finite_checks is not None:
            self._deferred_finite_checks.append((output.loss, output.components, inputs))
        else:
            self.check_finite(output.loss, output.components, inputs)
        if training:
            self.record_components(output.components)
        return output.loss

    def record_components(self, components: dict[str, torch.Tensor]) -> None:
        for name, value in components.items():  # summed on the device: no host sync per step
            self._component_sums[name] = self._component_sums[name] + torch.as_tensor(value).detach().float()
            self._component_counts[name] += 1

    def cached_training_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """A training step through `GradCache`: same loss, components and NaN guard, memory of one mini-batch."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps

        def compute(query: Any, passages: Any) -> LossOutput:
            batch = self.retrieval_batch(inputs, RetrieverOutput(query=query, passages=passages))
            return self.loss(query, passages, batch, self.state.global_step)

        with self.compute_loss_context_manager():
            output = self.grad_cache.step(
                # one model call (DDP's hooks); `passages=`, since ModelOutput unpacks a lone first field
                encode=lambda features: model(passages=features).passages,
                query_features=inputs["query"],
                passage_features=inputs["passages"],
                compute_loss=compute,
                hooks=backward_hooks(self.accelerator, model),  # each mini-batch's backward through the engine
                loss_scale=scale,
                check=lambda out: self.check_finite(out.loss, out.components, inputs),
            )
        self.record_components(output.components)
        return output.loss * scale

    def check_finite(self, loss: torch.Tensor, components: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        """Stop (or skip the batch) at a NaN/inf, naming the step, the component and the records of the batch."""
        values = {"loss": loss.detach(), **components}
        finite = torch.stack(
            [torch.as_tensor(v, device=loss.device).detach().float().reshape(()) for v in values.values()]
        )
        all_finite = bool(torch.isfinite(finite).all())  # one host sync for every component together
        bad = [] if all_finite else [name for name, value in values.items() if not math.isfinite(float(value))]
        skip = self.args.nan_policy == "skip" and self.model.training
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
            if self.grad_cache is not None:
                return self.cached_training_step(model, inputs)
            self._deferred_finite_checks = [] if self.args.nan_policy == "stop" else None
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                deferred, self._deferred_finite_checks = self._deferred_finite_checks, None
            for check in deferred or ():
                self.check_finite(*check)
            return loss
        except _SkipBatch:
            self._component_sums["skipped_batches"] += 1.0
            self._component_counts["skipped_batches"] = 1  # logged as a count per logging window
            return torch.zeros((), device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_counts:
            # one tensor, one collective and one device-to-host copy for all components (not one per component)
            names = list(self._component_sums)
            means = torch.stack(
                [
                    torch.as_tensor(self._component_sums[name], dtype=torch.float32, device=self.args.device).reshape(
                        ()
                    )
                    / max(self._component_counts[name], 1)
                    for name in names
                ]
            )
            values = self.accelerator.reduce(means, reduction="mean").tolist()
            logs.update({name: round(value, 6) for name, value in zip(names, values)})
            self._component_sums.clear()
            self._component_counts.clear()
        if self.curriculum is not None and "loss" in logs:
            self.curriculum.annotate_logs(logs, self.state.global_step)
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ evaluation
    def run_evaluators(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Every evaluator's metrics on the unwrapped model, keys prefixed (`eval_dense_ndcg@10`)."""
        model = self.accelerator.unwrap_model(self.model)
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            for key, value in evaluator(model).items():
                metrics[f"{metric_key_prefix}_{key}"] = value
        return metrics

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        # With an eval dataset *and* evaluators, the evaluators' metrics join the loop's, so `evaluate` logs once.
        output = super().evaluation_loop(*args, **kwargs)
        if self.evaluators:
            output.metrics.update(self.run_evaluators(kwargs.get("metric_key_prefix", "eval")))
        return output

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if eval_dataset is not None or self.eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if not self.evaluators:
            return {}
        metrics = self.run_evaluators(metric_key_prefix)
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

    # ------------------------------------------------------------------------------------------ save / card
    def after_final_save(self, output_dir: str) -> None:
        from ark_hf.hub import write_model_card

        write_model_card(self, output_dir)  # README.md (and the training plot) of the final model

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # `Trainer.push_to_hub` calls this before uploading; ours replaces transformers' generic card
        if self.is_world_process_zero():
            from ark_hf.hub import write_model_card

            write_model_card(self, self.args.output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        preflight.check_before_training(self, resume_from_checkpoint)  # the output directory's check included
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        preflight.check_training_happened(self)
        return result
