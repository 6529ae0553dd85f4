"""Curriculum training: several data stages in one `trainer.train()`, ending with an optional checkpoint merge.

Qwen3-Embedding is trained in three stages (report, sec. 3.2-3.3): (1) weakly supervised synthetic pairs,
(2) supervised high-quality data, (3) a slerp merge of checkpoints saved during stage 2. A stage plan says
this in YAML (the format and its checks: `ark_hf.callbacks.stage_plan`):

```yaml
stages:
  - name: weak_pairs
    datasets: [data/stage1_pairs.jsonl]
    epochs: 1                      # or `steps: 5000` (optimizer steps)
    train_group_size: 1            # pairs: in-batch negatives only
  - name: supervised
    datasets: [data/stage2_supervised.jsonl, data/stage2_synthetic_filtered.jsonl]
    epochs: 2
    learning_rate_scale: 0.5       # multiplies the scheduled learning rate during this stage
    loss: {temperature: 0.05}      # any QwenTrainer loss option: temperature, use_qq, use_dd, ...
  - name: merge
    merge:
      method: slerp
      checkpoints: {last_n: 3}     # or {steps: [4000, 5000, 6000]}
      from_stage: supervised       # default: the data stage just before
```

How it works. The whole plan is **one deterministic stream of batches**: `CurriculumBatchSampler` yields
stage 1's batches (its epochs, each reshuffled from the seed, the stage and the stage-epoch), then stage 2's,
and so on, over `CurriculumDataset`, whose items carry their stage-epoch so that group sampling (positive and
negatives) is a pure function of `(seed, stage, stage-epoch, record)`. Consequences:

- the data switches at stage boundaries inside one `trainer.train()`; every optimizer step lies inside
  one stage (a stage has `steps x gradient_accumulation_steps x processes` batches);
- `max_steps` is the sum of the stages' steps, so the learning-rate schedule (warm-up, decay) spans the plan;
- the stage is a pure function of the global step, and the Trainer's own resume (`skip_first_batches` over
  the same stream) reproduces the data order exactly; the stage and a fingerprint of the plan are written to
  every checkpoint (`trainer_state.json`, `stateful_callbacks`), and a resume with a different plan is refused;
- all stages' data are read and validated when the trainer is built, before anything is written.

`CurriculumCallback` applies the per-stage options at `on_step_begin` (the learning-rate scale multiplies the
optimizer's learning rates after the scheduler set them and is undone after the optimizer step; loss options
go to the trainer), saves a checkpoint at the end of every data stage, logs `curriculum/stage`, and at the end
of training merges the chosen checkpoints with `ark_hf.merging.merge_checkpoints` into
`<output_dir>/stage<k>_merged` (a full model folder that `DecoderEmbedder.from_pretrained` and
`SentenceTransformer` load; with `merge_lora_on_save=False`, an adapter folder).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
from transformers.utils import logging

from ark_hf.callbacks.stage_plan import MergeSpec, Stage, StagePlanError, load_stage_plan, parse_stages
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.data.schema import DataValidationError

if TYPE_CHECKING:  # pragma: no cover
    from ark_hf.trainer.base import BaseRetrieverTrainer

logger = logging.get_logger(__name__)

__all__ = [
    "CurriculumBatchSampler",
    "CurriculumCallback",
    "CurriculumDataset",
    "CurriculumIndex",
    "MergeSpec",
    "Stage",
    "StagePlanError",
    "load_stage_plan",
]


# ------------------------------------------------------------------------------------------------ data stream
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


def _stage_seed(seed: int, stage_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/curriculum/{stage_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------------------ the callback
class CurriculumCallback(TrainerCallback, ExportableState):
    """Runs a stage plan inside one `trainer.train()` (see the module docstring for the design).

    Args:
        stages: `Stage`s or mappings in the plan-file form (`{"name": ..., "datasets": [...], "epochs": 1}`).
        source: where the stages came from, for messages (a plan file path).

    Use it through `QwenTrainerConfig(curriculum="plan.yaml")`, or pass an instance in `callbacks=[...]` of
    a `QwenTrainer`; the trainer loads the stages' data and binds the callback.

    Attributes:
        stages: the plan.
        stage_steps: optimizer steps of each stage (0 for the merge), known once bound.
        total_steps: the plan's optimizer steps (the Trainer's `max_steps`).
        merge_steps: global steps of the checkpoints the merge reads.
        merged_path: the merged model folder, once written.
    """

    def __init__(self, stages: Sequence[Stage | Mapping[str, Any]], source: str | None = None) -> None:
        self.stages = parse_stages(list(stages), source or "<stages>")
        self.source = source
        self.stage_records: list[list[dict]] | None = None
        self.stage_steps: list[int] = []
        self.stage_batches: list[int] = []
        self.stage_datasets: list[TrainGroupDataset] = []
        self.stage_samplers: list[BatchSampler] = []
        self.merge_steps: list[int] = []
        self.merged_path: str | None = None
        self.fingerprint: str | None = None
        self._trainer: BaseRetrieverTrainer | None = None
        self._current: int | None = None
        self._scaled: list[tuple[dict, float, float]] = []

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CurriculumCallback:
        return cls(load_stage_plan(path), source=str(path))

    # ------------------------------------------------------------------------------------------ plan geometry
    @property
    def data_stages(self) -> list[int]:
        return [index for index, stage in enumerate(self.stages) if not stage.is_merge]

    @property
    def merge_stage(self) -> Stage | None:
        return self.stages[-1] if self.stages[-1].is_merge else None

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    @property
    def stage_end_steps(self) -> list[int]:
        """Global step that ends each data stage (cumulative steps)."""
        ends, total = [], 0
        for index in self.data_stages:
            total += self.stage_steps[index]
            ends.append(total)
        return ends

    def stage_range(self, stage_index: int) -> tuple[int, int]:
        """`(first, last)` global step numbers (1-based, inclusive) of a data stage."""
        start = sum(self.stage_steps[:stage_index])
        return start + 1, start + self.stage_steps[stage_index]

    def stage_at(self, step_index: int) -> int:
        """Index of the stage that optimizer step `step_index` (0-based: `state.global_step` before it) belongs to."""
        for index in self.data_stages:
            first, last = self.stage_range(index)
            if step_index < last:
                return index
        return self.data_stages[-1]

    # ------------------------------------------------------------------------------------------ data
    def load_data(self, load_records: Callable[[list[str]], list[dict]]) -> None:
        """Read and validate every data stage's records (all stages' problems are reported together)."""
        issues = []
        records: list[list[dict]] = []
        for stage in self.stages:
            if stage.is_merge:
                records.append([])
                continue
            try:
                records.append(load_records(list(stage.datasets)))
            except DataValidationError as error:
                issues.extend(error.issues)
                records.append([])
        if issues:
            raise DataValidationError(issues, max_shown=None)
        self.stage_records = records

    def bind(self, trainer: BaseRetrieverTrainer) -> None:
        """Build the stages' datasets and samplers, size the plan, set `max_steps`, check the merge's checkpoints."""
        if self.stage_records is None:
            raise RuntimeError("CurriculumCallback.load_data must run before bind")
        args = trainer.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        per_step = args.gradient_accumulation_steps * max(args.world_size, 1)
        self.stage_datasets, self.stage_samplers, self.stage_steps, self.stage_batches = [], [], [], []
        for index, stage in enumerate(self.stages):
            if stage.is_merge:
                self.stage_steps.append(0)
                self.stage_batches.append(0)
                continue
            stage_seed = _stage_seed(seed, index)
            group_size = stage.train_group_size or args.train_group_size
            if hasattr(trainer, "check_stage_options"):
                trainer.check_stage_options(dict(stage.loss), group_size, where=f"stage '{stage.name}'")
            elif stage.loss:
                raise ValueError(f"stage '{stage.name}' overrides loss options, which {type(trainer).__name__} lacks")
            dataset = TrainGroupDataset(
                self.stage_records[index],
                train_group_size=group_size,
                seed=stage_seed,
                query_instruction=stage.query_instruction
                if stage.query_instruction is not None
                else args.query_instruction,
                query_instruction_format=args.query_instruction_format,
                dataset_instructions=args.dataset_instructions,
                passage_instruction=args.passage_instruction,
                passage_instruction_format=args.passage_instruction_format,
                use_teacher_scores=trainer.uses_teacher_scores(args),
            )
            sampler = trainer.build_batch_sampler(dataset)
            sampler.seed = stage_seed
            per_epoch = len(sampler)
            if per_epoch == 0:
                raise ValueError(
                    f"stage '{stage.name}': {len(dataset)} records make no batch of {trainer._train_batch_size} "
                    "(dataloader_drop_last is on); add data or lower the batch size"
                )
            steps = stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * per_epoch / per_step))
            self.stage_datasets.append(dataset)
            self.stage_samplers.append(sampler)
            self.stage_steps.append(steps)
            self.stage_batches.append(steps * per_step)
        if args.max_steps > 0 and args.max_steps != self.total_steps:
            raise ValueError(
                f"max_steps={args.max_steps} but the stage plan has {self.total_steps} steps "
                f"({', '.join(f'{s.name}: {n}' for s, n in zip(self.stages, self.stage_steps) if not s.is_merge)}); "
                "the plan sets the length: leave max_steps unset"
            )
        args.max_steps = self.total_steps
        self.fingerprint = self._fingerprint(args, trainer._train_batch_size, seed)
        if self.merge_stage is not None:
            self.merge_steps = self._choose_merge_checkpoints(args)
        self._trainer = trainer
        self._log_plan()

    def build_dataloader(self) -> DataLoader:
        """The plan's DataLoader, prepared by the trainer's accelerator (sharded across processes)."""
        trainer = self._require_trainer()
        args = trainer.args
        dataloader = DataLoader(
            CurriculumDataset(self.stage_datasets),
            batch_sampler=CurriculumBatchSampler(
                self.stage_samplers, [n for n in self.stage_batches if n], trainer._train_batch_size
            ),
            collate_fn=trainer.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=False,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
        )
        return trainer.accelerator.prepare(dataloader)

    def dataset(self) -> CurriculumDataset:
        return CurriculumDataset(self.stage_datasets)

    def _fingerprint(self, args: Any, batch_size: int, seed: int) -> str:
        """Identity of the data stream: a resume is refused when it changes."""
        payload = {
            "stages": [stage.to_dict() for stage in self.stages],
            "records": [len(records) for records in self.stage_records or []],
            "steps": self.stage_steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _choose_merge_checkpoints(self, args: Any) -> list[int]:
        """Global steps whose checkpoints the merge reads, checked against what the run will save and keep."""
        merge = self.merge_stage.merge
        data_names = [self.stages[i].name for i in self.data_stages]
        source = data_names.index(merge.from_stage) if merge.from_stage else len(data_names) - 1
        first, last = self.stage_range(self.data_stages[source])
        saved = set(self.stage_end_steps)  # this callback saves at every stage end
        if args.save_strategy == SaveStrategy.STEPS:
            every = args.save_steps if args.save_steps >= 1 else math.ceil(self.total_steps * args.save_steps)
            saved.update(range(int(every), self.total_steps + 1, int(every)))
        saved_sorted = sorted(saved)
        in_stage = [step for step in saved_sorted if first <= step <= last]
        name = data_names[source]
        if merge.last_n is not None:
            if merge.last_n > len(in_stage):
                raise ValueError(
                    f"merge: last_n={merge.last_n} checkpoints of stage '{name}' wanted, but the run saves "
                    f"{len(in_stage)} during it (steps {in_stage}; stage steps {first}-{last}); lower save_steps"
                )
            chosen = in_stage[-merge.last_n :]
        else:
            missing = [step for step in merge.steps if step not in in_stage]
            if missing:
                raise ValueError(
                    f"merge: no checkpoint of stage '{name}' at steps {missing}; the run saves during that stage at "
                    f"steps {in_stage} (stage steps {first}-{last})"
                )
            chosen = sorted(merge.steps)
        limit = args.save_total_limit
        if limit is not None and limit > 0:
            kept = saved_sorted[-limit:]
            lost = [step for step in chosen if step not in kept]
            if lost:
                raise ValueError(
                    f"merge: save_total_limit={limit} deletes the checkpoints of steps {lost} before the merge reads "
                    f"them; raise save_total_limit to at least {len(saved_sorted) - saved_sorted.index(min(chosen))}"
                )
        return chosen

    def _log_plan(self) -> None:
        lines = []
        for index, stage in enumerate(self.stages):
            if stage.is_merge:
                lines.append(f"  {index + 1}. {stage.name}: {stage.merge.method} merge of steps {self.merge_steps}")
                continue
            first, last = self.stage_range(index)
            lines.append(
                f"  {index + 1}. {stage.name}: steps {first}-{last} ({self.stage_steps[index]}), "
                f"{len(self.stage_records[index])} records from {', '.join(stage.datasets)}"
            )
        logger.info("Curriculum (%d optimizer steps):\n%s", self.total_steps, "\n".join(lines))

    def _require_trainer(self) -> BaseRetrieverTrainer:
        if self._trainer is None:
            raise RuntimeError(
                "CurriculumCallback is not bound to a trainer: pass it to QwenTrainer(callbacks=[...]) or set "
                "QwenTrainerConfig.curriculum"
            )
        return self._trainer

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._require_trainer()
        self._current = None
        if state.global_step > 0:
            saved = state.stateful_callbacks.get(type(self).__name__)
            saved = saved[0] if isinstance(saved, list) and saved else saved
            attributes = (saved or {}).get("attributes", {}) if isinstance(saved, Mapping) else {}
            if attributes.get("plan_fingerprint") is None:
                raise ValueError(
                    f"the checkpoint at step {state.global_step} holds no curriculum state: it was not written by "
                    "this stage plan; start a new run (load its weights as the model) instead of resuming"
                )
            if attributes["plan_fingerprint"] != self.fingerprint:
                raise ValueError(
                    f"the checkpoint at step {state.global_step} was written with another stage plan or batch geometry "
                    f"(fingerprint {attributes['plan_fingerprint']} != {self.fingerprint}); resuming would change the "
                    "data order. Restore the plan, data, batch size, accumulation, process count and seed of that run."
                )
            stage = self.stages[self.stage_at(state.global_step)]
            logger.info("Curriculum: resuming at step %d in stage '%s'", state.global_step, stage.name)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        index = self.stage_at(state.global_step)
        stage = self.stages[index]
        if index != self._current:
            self._current = index
            trainer = self._require_trainer()
            if hasattr(trainer, "apply_loss_overrides"):
                trainer.apply_loss_overrides(dict(stage.loss))
            logger.info("Curriculum: stage '%s' at step %d", stage.name, state.global_step + 1)
        self._scaled = []
        if stage.learning_rate_scale != 1.0 and optimizer is not None:
            for group in optimizer.param_groups:
                unscaled = group["lr"]
                group["lr"] = unscaled * stage.learning_rate_scale
                self._scaled.append((group, group["lr"], unscaled))

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Undo the scale before the scheduler steps, so that a scheduler that reads the current rate (chainable
        # schedulers) does not compound it. Where the scheduler already stepped (DeepSpeed steps it inside the
        # engine) the rate differs from the scaled one and is kept: exact for the Trainer's schedulers (LambdaLR
        # recomputes from the base rate); a chainable scheduler handed to DeepSpeed would see the scaled rate.
        for group, scaled, unscaled in self._scaled:
            if group["lr"] == scaled:
                group["lr"] = unscaled
        self._scaled = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.stage_end_steps:
            control.should_save = True  # every stage ends with a checkpoint (its final model; the merge reads them)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.merge_stage is None:
            return
        if state.global_step < self.total_steps:
            logger.info(
                "Curriculum: training stopped at step %d of %d; the merge stage did not run",
                state.global_step,
                self.total_steps,
            )
            return
        self.merge()

    def merge(self) -> str | None:
        """Merge the chosen checkpoints into `<output_dir>/<output>`; returns the folder (None on other ranks)."""
        from ark_hf.merging import merge_checkpoints

        trainer = self._require_trainer()
        stage = self.merge_stage
        index = len(self.stages) - 1
        output = Path(trainer.args.output_dir) / (stage.merge.output or f"stage{index + 1}_merged")
        if trainer.args.should_save:
            paths = [Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" for step in self.merge_steps]
            missing = [str(path) for path in paths if not path.is_dir()]
            if missing:
                raise FileNotFoundError(f"merge stage '{stage.name}': checkpoints not found: {', '.join(missing)}")
            merge_checkpoints(
                paths,
                output,
                method=stage.merge.method,
                weights=stage.merge.weights,
                t=stage.merge.t,
                overwrite=True,
            )
            logger.info(
                "Curriculum: stage '%s' merged checkpoints %s (%s) into %s",
                stage.name,
                self.merge_steps,
                stage.merge.method,
                output,
            )
        trainer.accelerator.wait_for_everyone()
        self.merged_path = str(output)
        return self.merged_path

    def annotate_logs(self, logs: dict[str, float], global_step: int) -> None:
        """Add `curriculum/stage` (1-based) and report the learning rate the optimizer actually used."""
        if global_step < 1 or not self.stage_steps:
            return
        index = self.stage_at(global_step - 1)
        stage = self.stages[index]
        logs["curriculum/stage"] = index + 1
        if "learning_rate" in logs and stage.learning_rate_scale != 1.0:
            logs["learning_rate"] = logs["learning_rate"] * stage.learning_rate_scale

    # ------------------------------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        attributes: dict[str, Any] = {"plan_fingerprint": self.fingerprint}
        trainer = self._trainer
        if trainer is not None and self.stage_steps:
            step = trainer.state.global_step
            index = self.stage_at(max(step - 1, 0))
            first, _ = self.stage_range(index)
            attributes.update(
                {
                    "stage_index": index,
                    "stage_name": self.stages[index].name,
                    "steps_in_stage": max(step - first + 1, 0),
                    "global_step": step,
                    "stage_steps": list(self.stage_steps),
                    "merge_steps": list(self.merge_steps),
                }
            )
        return {
            "args": {"stages": [stage.to_dict() for stage in self.stages], "source": self.source},
            "attributes": attributes,
        }
