"""`CurriculumCallback`: applies a stage plan during one `trainer.train()`, ending with an optional checkpoint merge.

Qwen3-Embedding is trained in three stages (report, sec. 3.2-3.3): (1) weakly supervised synthetic pairs,
(2) supervised high-quality data, (3) a slerp merge of checkpoints saved during stage 2. A stage plan says
this in YAML (the format and its checks: `ark_hf.curriculum.plan`):

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
    loss: {temperature: 0.05}      # any option of the trainer's loss: temperature, use_qq, use_dd, ...
  - name: merge
    merge:
      method: slerp
      checkpoints: {last_n: 3}     # or {steps: [4000, 5000, 6000]}
      from_stage: supervised       # default: the data stage just before
```

Who does what. The trainer reads and validates every stage's data before the model loads, builds the stream of
batches (`ark_hf.curriculum.stream`: stage 1's batches, then stage 2's, ...) with its own dataset and sampler
builders, and sets `max_steps` to the plan's length, so the learning-rate schedule spans the plan. This callback
only observes and adjusts: at `on_step_begin` it gives the stage's loss options to the loss
(`loss.update_options`) and scales the learning rate (undone after the optimizer step); it saves a checkpoint at
the end of every data stage, logs `curriculum/stage`, refuses a resume written by another plan (fingerprint in
`trainer_state.json`), and at the end of training merges the chosen checkpoints with
`ark_hf.merging.merge_checkpoints` into `<output_dir>/stage<k>_merged`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ark_hf.curriculum.plan import CurriculumPlan, Stage, parse_stages

logger = logging.get_logger(__name__)

__all__ = ["CurriculumCallback"]


class CurriculumCallback(TrainerCallback, ExportableState):
    """Runs a stage plan inside one `trainer.train()` (see the module docstring).

    Args:
        stages: `Stage`s or mappings in the plan-file form (`{"name": ..., "datasets": [...], "epochs": 1}`).
        source: where the stages came from, for messages (a plan file path).

    Use it through `config.curriculum = "plan.yaml"`, or pass an instance in `callbacks=[...]` of a trainer; the
    trainer loads the stages' data, builds the stream and calls `bind`.

    Attributes:
        plan: the `CurriculumPlan` (stages; once bound, steps per stage and the merge's checkpoints).
        merged_path: the merged model folder, once written.
    """

    def __init__(self, stages: Sequence[Stage | Mapping[str, Any]], source: str | None = None) -> None:
        self.plan = CurriculumPlan(parse_stages(list(stages), source or "<stages>"), source)
        self.fingerprint: str | None = None
        self.merged_path: str | None = None
        self.loss: Any = None
        self.output_dir: str | None = None
        self._accelerator: Any = None
        self._should_save = True
        self._current: int | None = None
        self._global_step = 0
        self._scaled: list[tuple[dict, float, float]] = []

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CurriculumCallback:
        return cls(CurriculumPlan.from_yaml(path).stages, source=str(path))

    @property
    def stages(self) -> list[Stage]:
        return self.plan.stages

    def bind(self, *, loss: Any, fingerprint: str, output_dir: str, accelerator: Any, should_save: bool) -> None:
        """Called by the trainer once the stream is sized: the loss the stages configure and where the merge goes."""
        self.loss = loss
        self.fingerprint = fingerprint
        self.output_dir = output_dir
        self._accelerator = accelerator
        self._should_save = should_save

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        if self.fingerprint is None:
            raise RuntimeError(
                "CurriculumCallback is not bound to a trainer: pass it to the trainer's callbacks=[...] or set "
                "config.curriculum"
            )
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
            stage = self.stages[self.plan.stage_at(state.global_step)]
            logger.info("Curriculum: resuming at step %d in stage '%s'", state.global_step, stage.name)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        index = self.plan.stage_at(state.global_step)
        stage = self.stages[index]
        if index != self._current:
            self._current = index
            if self.loss is not None:
                self.loss.update_options(**stage.loss)
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
        self._global_step = state.global_step
        if state.global_step in self.plan.stage_end_steps:
            control.should_save = True  # every stage ends with a checkpoint (its final model; the merge reads them)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.plan.merge_stage is None:
            return
        if state.global_step < self.plan.total_steps:
            logger.info(
                "Curriculum: training stopped at step %d of %d; the merge stage did not run",
                state.global_step,
                self.plan.total_steps,
            )
            return
        self.merge()

    def merge(self) -> str | None:
        """Merge the chosen checkpoints into `<output_dir>/<output>`; returns the folder."""
        from ark_hf.merging import merge_checkpoints

        stage = self.plan.merge_stage
        index = len(self.stages) - 1
        output = Path(self.output_dir) / (stage.merge.output or f"stage{index + 1}_merged")
        if self._should_save:
            paths = [Path(self.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" for step in self.plan.merge_steps]
            missing = [str(path) for path in paths if not path.is_dir()]
            if missing:
                raise FileNotFoundError(f"merge stage '{stage.name}': checkpoints not found: {', '.join(missing)}")
            merge_checkpoints(
                paths, output, method=stage.merge.method, weights=stage.merge.weights, t=stage.merge.t, overwrite=True
            )
            logger.info(
                "Curriculum: stage '%s' merged checkpoints %s (%s) into %s",
                stage.name,
                self.plan.merge_steps,
                stage.merge.method,
                output,
            )
        if self._accelerator is not None:
            self._accelerator.wait_for_everyone()
        self.merged_path = str(output)
        return self.merged_path

    def annotate_logs(self, logs: dict[str, float], global_step: int) -> None:
        """Add `curriculum/stage` (1-based) and report the learning rate the optimizer actually used."""
        if global_step < 1 or not self.plan.stage_steps:
            return
        index = self.plan.stage_at(global_step - 1)
        stage = self.stages[index]
        logs["curriculum/stage"] = index + 1
        if "learning_rate" in logs and stage.learning_rate_scale != 1.0:
            logs["learning_rate"] = logs["learning_rate"] * stage.learning_rate_scale

    # ------------------------------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        attributes: dict[str, Any] = {"plan_fingerprint": self.fingerprint}
        if self.plan.stage_steps:
            step = self._global_step
            index = self.plan.stage_at(max(step - 1, 0))
            first, _ = self.plan.stage_range(index)
            attributes.update(
                {
                    "stage_index": index,
                    "stage_name": self.stages[index].name,
                    "steps_in_stage": max(step - first + 1, 0),
                    "global_step": step,
                    "stage_steps": list(self.plan.stage_steps),
                    "merge_steps": list(self.plan.merge_steps),
                }
            )
        return {
            "args": {"stages": [stage.to_dict() for stage in self.stages], "source": self.plan.source},
            "attributes": attributes,
        }
