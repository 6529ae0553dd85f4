"""The data side of a curriculum: one deterministic stream of batches over all stages.

`CurriculumBatchSampler` yields stage 1's batches (its epochs, each reshuffled from the seed, the stage and the
stage-epoch), then stage 2's, and so on, over `CurriculumDataset`, whose items carry their stage-epoch so that
group sampling (positive and negatives) is a pure function of `(seed, stage, stage-epoch, record)`. So:

- the data switches at stage boundaries inside one `trainer.train()`; every optimizer step lies inside one stage
  (a stage has `steps x gradient_accumulation_steps x processes` batches);
- `max_steps` is the sum of the stages' steps, so the learning-rate schedule (warm-up, decay) spans the plan;
- the stage is a pure function of the global step, and the Trainer's own resume (`skip_first_batches` over the
  same stream) reproduces the data order exactly.

`CurriculumStream` builds the stages' datasets and samplers with the builders it is given (the trainer passes its own
`build_group_dataset` and `build_batch_sampler`), so a stage batches exactly as `train_data` would. It knows the
trainer only through those builders and the config: nothing here imports the trainer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from transformers import TrainingArguments

from ark_hf.curriculum.plan import CurriculumPlan
from ark_hf.data.dataset import TrainGroupDataset

__all__ = ["CurriculumBatchSampler", "CurriculumDataset", "CurriculumIndex", "CurriculumStream", "stage_seed"]


class CurriculumIndex(NamedTuple):
    """The address of one item of the plan's stream: record `index` of stage `stage` in its epoch `epoch`."""

    stage: int
    epoch: int
    index: int


class CurriculumDataset(Dataset):
    """The stages' group datasets behind one index space of `CurriculumIndex` keys.

    The group of a record (sampled positive and negatives) depends on the stage's seed, the stage-epoch and
    the record, as in `TrainGroupDataset`, whatever the order or process that asks for it.
    """

    def __init__(self, stage_datasets: Sequence[TrainGroupDataset]) -> None:
        self.stage_datasets = list(stage_datasets)

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.stage_datasets)

    def __getitem__(self, key: CurriculumIndex) -> dict[str, Any]:
        dataset = self.stage_datasets[key.stage]
        # the epoch is set right before the read: each DataLoader worker holds its own copy of the dataset
        dataset.set_epoch(key.epoch)
        return dataset[key.index]


class CurriculumBatchSampler(BatchSampler):
    """Stage 1's batches, then stage 2's, ...: `stage_batches[k]` batches of stage k's sampler.

    A stage's batches are its sampler's epochs 0, 1, 2, ... in turn (each reshuffled from the stage's seed),
    cut after `stage_batches[k]` batches. The stream is a pure function of the samplers' seeds, so the
    Trainer's resume (skipping the first batches) sees the batches an uninterrupted run would.
    """

    def __init__(self, stage_samplers: Sequence[BatchSampler], stage_batches: Sequence[int], batch_size: int) -> None:
        # BatchSampler's own attributes, read by accelerate when it shards batches across processes
        super().__init__(SequentialSampler(range(sum(stage_batches))), batch_size, drop_last=False)
        if len(stage_samplers) != len(stage_batches):
            raise ValueError("one batch count per stage sampler")
        self.stage_samplers = list(stage_samplers)
        self.stage_batches = [int(n) for n in stage_batches]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # the Trainer runs the plan as its epoch 0 (max_steps = the plan's steps); nothing depends on it
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.stage_batches)

    def __iter__(self):
        for stage, (sampler, needed) in enumerate(zip(self.stage_samplers, self.stage_batches)):
            produced, epoch = 0, 0
            while produced < needed:
                sampler.set_epoch(epoch)
                for batch in sampler:
                    yield [CurriculumIndex(stage, epoch, index) for index in batch]
                    produced += 1
                    if produced == needed:
                        break
                epoch += 1


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed of one stage's sampling, derived from the run's seed."""
    digest = hashlib.blake2b(f"{seed}/curriculum/{stage_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CurriculumStream:
    """The stages' datasets and samplers, sized: sets `plan.stage_steps` (and the merge's checkpoints).

    Args:
        plan: the stage plan.
        stage_records: validated records of each stage (`[]` for the merge).
        args: the training config (seeds, group size, accumulation, processes, dataloader settings).
        batch_size: query groups per batch on one process (the trainer's `_train_batch_size`).
        build_dataset: `(records, args, *, train_group_size, seed, query_instruction) -> TrainGroupDataset`.
        build_sampler: `(dataset) -> BatchSampler` with a `seed` attribute and `set_epoch`.
        check_stage_options: `(overrides, *, train_group_size, where)`, raising on loss options that cannot train
            (`RetrievalLoss.check_stage_options`).
    """

    def __init__(
        self,
        plan: CurriculumPlan,
        stage_records: Sequence[list[dict]],
        args: TrainingArguments,
        *,
        batch_size: int,
        build_dataset: Callable[..., TrainGroupDataset],
        build_sampler: Callable[[TrainGroupDataset], BatchSampler],
        check_stage_options: Callable[..., None],
    ) -> None:
        self.args = args
        self.plan = plan
        self.stage_records = list(stage_records)
        self.batch_size = batch_size
        seed = args.data_seed if args.data_seed is not None else args.seed
        per_step = args.gradient_accumulation_steps * max(args.world_size, 1)
        self.stage_datasets: list[TrainGroupDataset] = []
        self.stage_samplers: list[BatchSampler] = []
        self.stage_batches: list[int] = []
        stage_steps: list[int] = []
        for index, stage in enumerate(plan.stages):
            if stage.is_merge:
                stage_steps.append(0)
                self.stage_batches.append(0)
                continue
            seed_k = stage_seed(seed, index)
            group_size = stage.train_group_size or args.train_group_size
            check_stage_options(dict(stage.loss), train_group_size=group_size, where=f"stage '{stage.name}'")
            dataset = build_dataset(
                self.stage_records[index],
                args,
                train_group_size=group_size,
                seed=seed_k,
                query_instruction=stage.query_instruction,
            )
            sampler = build_sampler(dataset)
            sampler.seed = seed_k
            per_epoch = len(sampler)
            if per_epoch == 0:
                raise ValueError(
                    f"stage '{stage.name}': {len(dataset)} records make no batch of {self.batch_size} "
                    "(dataloader_drop_last is on); add data or lower the batch size"
                )
            steps = stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * per_epoch / per_step))
            self.stage_datasets.append(dataset)
            self.stage_samplers.append(sampler)
            stage_steps.append(steps)
            self.stage_batches.append(steps * per_step)
        plan.stage_steps = stage_steps
        if args.max_steps > 0 and args.max_steps != plan.total_steps:
            raise ValueError(
                f"max_steps={args.max_steps} but the stage plan has {plan.total_steps} steps "
                f"({', '.join(f'{s.name}: {n}' for s, n in zip(plan.stages, stage_steps) if not s.is_merge)}); "
                "the plan sets the length: leave max_steps unset"
            )
        if plan.merge_stage is not None:
            plan.merge_steps = plan.choose_merge_checkpoints(args)
        self.fingerprint = plan.fingerprint([len(r) for r in self.stage_records], args, self.batch_size, seed)

    def dataset(self) -> CurriculumDataset:
        return CurriculumDataset(self.stage_datasets)

    def dataloader(
        self, collate_fn: Callable[[list[dict[str, Any]]], Any], prepare: Callable[[DataLoader], DataLoader]
    ) -> DataLoader:
        """The plan's DataLoader, passed through `prepare` (the trainer's `accelerator.prepare`: sharded across
        processes)."""
        args = self.args
        dataloader = DataLoader(
            self.dataset(),
            batch_sampler=CurriculumBatchSampler(
                self.stage_samplers, [n for n in self.stage_batches if n], self.batch_size
            ),
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=False,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
        )
        return prepare(dataloader)

    def describe(self) -> str:
        lines = []
        plan = self.plan
        for index, stage in enumerate(plan.stages):
            if stage.is_merge:
                lines.append(f"  {index + 1}. {stage.name}: {stage.merge.method} merge of steps {plan.merge_steps}")
                continue
            first, last = plan.stage_range(index)
            lines.append(
                f"  {index + 1}. {stage.name}: steps {first}-{last} ({plan.stage_steps[index]}), "
                f"{len(self.stage_records[index])} records from {', '.join(stage.datasets)}"
            )
        return f"Curriculum ({plan.total_steps} optimizer steps):\n" + "\n".join(lines)
