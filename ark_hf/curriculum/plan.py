"""Stage plans: the YAML format, its checks, the `Stage` / `MergeSpec` it parses into, and `CurriculumPlan`, the
plan's geometry (steps per stage, the stage of a step, the merge's checkpoints, the fingerprint of the stream).

```yaml
stages:
  - name: weak_pairs                 # unique; default stage<k>
    datasets: [data/stage1_pairs.jsonl]
    epochs: 1                        # or `steps: N` (optimizer steps); exactly one of them
    train_group_size: 1              # optional: passages per query during the stage
    query_instruction: "..."         # optional: the stage's query instruction
  - name: supervised
    datasets: [data/stage2.jsonl]
    steps: 5000
    learning_rate_scale: 0.5         # optional: factor on the scheduled learning rate
    loss: {temperature: 0.05, use_qq: false}   # optional: the trainer's loss options
  - name: merge                      # optional, last: no data
    merge:
      method: slerp                  # or linear
      checkpoints: {last_n: 3}       # or {steps: [4000, 4500, 5000]}
      from_stage: supervised         # default: the data stage before the merge
      weights: [1, 1, 1]             # optional (or `t` for two checkpoints)
      output: stage3_merged          # optional folder name under output_dir
```

Every problem is reported at once, each with the file, the 1-based line, the path and the key, e.g.
`plan.yaml:8: stages[1].lr_scale: key 'lr_scale': unknown key (expected one of: ...)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import SaveStrategy

from ark_hf.losses.qwen3 import QWEN3_LOSS_OPTION_TYPES as LOSS_OPTION_TYPES
from ark_hf.utils.cli import ConfigError, did_you_mean, resolve_config_file

__all__ = ["CurriculumPlan", "MergeSpec", "Stage", "StagePlanError", "load_stage_plan", "parse_stages"]

PLAN_KEYS = ("stages",)
STAGE_KEYS = (
    "name",
    "datasets",
    "steps",
    "epochs",
    "learning_rate_scale",
    "loss",
    "train_group_size",
    "query_instruction",
    "merge",
)
MERGE_KEYS = ("method", "checkpoints", "from_stage", "weights", "t", "output")
CHECKPOINT_KEYS = ("last_n", "steps")
MERGE_METHODS = ("slerp", "linear")


class StagePlanError(ConfigError):
    """A stage plan that does not describe a valid curriculum; the message lists every problem with its line."""


@dataclass(frozen=True)
class MergeSpec:
    """The merge that closes a plan: which checkpoints of which stage, and how.

    Args:
        method: `slerp` (Qwen3-Embedding) or `linear`.
        last_n: merge the last `n` checkpoints saved during `from_stage` (its final checkpoint included).
        steps: or these global steps' checkpoints (each must be saved during `from_stage`).
        from_stage: name of the data stage whose checkpoints are merged; default: the stage before the merge.
        weights, t: see `ark_hf.merging.merge_state_dicts` (default: equal weights).
        output: folder name under `output_dir`; default `stage<k>_merged`, k the 1-based index of the merge stage.
    """

    method: str = "slerp"
    last_n: int | None = None
    steps: tuple[int, ...] | None = None
    from_stage: str | None = None
    weights: tuple[float, ...] | None = None
    t: float | None = None
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        checkpoints = {"last_n": self.last_n} if self.last_n is not None else {"steps": list(self.steps or ())}
        out: dict[str, Any] = {"method": self.method, "checkpoints": checkpoints}
        for key in ("from_stage", "t", "output"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.weights is not None:
            out["weights"] = list(self.weights)
        return out


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: a data stage (`datasets` + `steps` or `epochs`) or the final `merge`.

    Args:
        name: unique name (logged, stored in checkpoints, used by `merge.from_stage`).
        datasets: files or folders of training records (any layout `load_training_records` accepts).
        steps: length in optimizer steps; or
        epochs: length in passes over the stage's data (may be fractional; rounded up to whole steps).
        learning_rate_scale: factor on the scheduled learning rate during the stage.
        loss: loss options of the trainer to override during the stage (QwenTrainer: `temperature`,
            `false_negative_margin`, `mask_false_negatives`, `in_batch_negatives`, `use_qq`, `use_dd`,
            `use_inbatch_qd`).
        train_group_size: passages per query during the stage (default: the config's).
        query_instruction: query instruction during the stage (default: the config's; a record's `prompt` wins).
        merge: makes this the merge stage (no data; must be last).
    """

    name: str
    datasets: tuple[str, ...] = ()
    steps: int | None = None
    epochs: float | None = None
    learning_rate_scale: float = 1.0
    loss: Mapping[str, Any] = field(default_factory=dict)
    train_group_size: int | None = None
    query_instruction: str | None = None
    merge: MergeSpec | None = None

    @property
    def is_merge(self) -> bool:
        return self.merge is not None

    def to_dict(self) -> dict[str, Any]:
        """The plan-file form of the stage (what `CurriculumCallback(stages=[...])` accepts back)."""
        if self.merge is not None:
            return {"name": self.name, "merge": self.merge.to_dict()}
        out: dict[str, Any] = {"name": self.name, "datasets": list(self.datasets)}
        out["steps" if self.steps is not None else "epochs"] = self.steps if self.steps is not None else self.epochs
        if self.learning_rate_scale != 1.0:
            out["learning_rate_scale"] = self.learning_rate_scale
        if self.loss:
            out["loss"] = dict(self.loss)
        for key in ("train_group_size", "query_instruction"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class _Problems:
    """Collects `file:line: key 'k': message` entries while a plan is checked."""

    def __init__(self, source: str, lines: Mapping[tuple, int]) -> None:
        self.source = source
        self.lines = lines
        self.messages: list[str] = []

    def add(self, path: tuple, message: str) -> None:
        line = self.lines.get(path)
        while line is None and path:  # a missing key: point at the mapping that lacks it
            path = path[:-1]
            line = self.lines.get(path)
        where = f"{self.source}:{line}" if line else self.source
        self.messages.append(f"{where}: {_path_name(path)}: {message}")

    def raise_if_any(self) -> None:
        if self.messages:
            noun = "problem" if len(self.messages) == 1 else "problems"
            raise StagePlanError(
                f"invalid stage plan {self.source} ({len(self.messages)} {noun}):\n  " + "\n  ".join(self.messages)
            )


def _path_name(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<plan>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(raw: Mapping, allowed: Sequence[str], path: tuple, problems: _Problems) -> None:
    for key in raw:
        if key not in allowed:
            problems.add(path + (key,), f"key '{key}': unknown key (expected one of: {', '.join(allowed)})")


def _parse_merge(raw: Any, path: tuple, problems: _Problems) -> MergeSpec | None:
    if not isinstance(raw, Mapping):
        problems.add(path, f"key 'merge': expected a mapping, got {type(raw).__name__}")
        return None
    _check_keys(raw, MERGE_KEYS, path, problems)
    method = raw.get("method", "slerp")
    if method not in MERGE_METHODS:
        problems.add(path + ("method",), f"key 'method': expected one of {MERGE_METHODS}, got {method!r}")
    checkpoints = raw.get("checkpoints")
    last_n = steps = None
    if not isinstance(checkpoints, Mapping):
        problems.add(path + ("checkpoints",), "key 'checkpoints': expected {last_n: N} or {steps: [S1, S2, ...]}")
    else:
        _check_keys(checkpoints, CHECKPOINT_KEYS, path + ("checkpoints",), problems)
        if ("last_n" in checkpoints) == ("steps" in checkpoints):
            problems.add(path + ("checkpoints",), "key 'checkpoints': give exactly one of last_n and steps")
        elif "last_n" in checkpoints:
            last_n = checkpoints["last_n"]
            if not _is_int(last_n) or last_n < 1:
                problems.add(
                    path + ("checkpoints", "last_n"), f"key 'last_n': expected an integer >= 1, got {last_n!r}"
                )
                last_n = None
        else:
            steps = checkpoints["steps"]
            if not isinstance(steps, list) or not steps or not all(_is_int(s) and s >= 1 for s in steps):
                problems.add(
                    path + ("checkpoints", "steps"),
                    f"key 'steps': expected a list of global steps >= 1, got {steps!r}",
                )
                steps = None
            elif len(set(steps)) != len(steps):
                problems.add(path + ("checkpoints", "steps"), f"key 'steps': duplicate steps in {steps}")
                steps = None
            else:
                steps = tuple(steps)
    weights = raw.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
            problems.add(path + ("weights",), f"key 'weights': expected a list of numbers, got {weights!r}")
            weights = None
        else:
            weights = tuple(float(w) for w in weights)
    t = raw.get("t")
    if t is not None and not _is_number(t):
        problems.add(path + ("t",), f"key 't': expected a number in [0, 1], got {t!r}")
        t = None
    count = last_n if last_n is not None else (len(steps) if steps is not None else None)
    if count is not None and method in MERGE_METHODS:
        from ark_hf.merging import _resolve_weights

        try:
            _resolve_weights(count, method, weights, t)
        except ValueError as error:
            problems.add(path, f"key 'merge': {error}")
    for key in ("from_stage", "output"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            problems.add(path + (key,), f"key '{key}': expected a non-empty string, got {value!r}")
    output = raw.get("output")
    if isinstance(output, str) and (os.path.isabs(output) or ".." in Path(output).parts):
        problems.add(path + ("output",), f"key 'output': expected a folder name under output_dir, got {output!r}")
    return MergeSpec(
        method=method,
        last_n=last_n,
        steps=steps,
        from_stage=raw.get("from_stage"),
        weights=weights,
        t=None if t is None else float(t),
        output=output,
    )


def _parse_stage(raw: Any, index: int, problems: _Problems) -> Stage | None:
    path = ("stages", index)
    if isinstance(raw, Stage):
        return raw
    if not isinstance(raw, Mapping):
        problems.add(path, f"expected a mapping (a stage), got {type(raw).__name__}")
        return None
    _check_keys(raw, STAGE_KEYS, path, problems)
    name = raw.get("name", f"stage{index + 1}")
    if not isinstance(name, str) or not name:
        problems.add(path + ("name",), f"key 'name': expected a non-empty string, got {name!r}")
        name = f"stage{index + 1}"
    if "merge" in raw:
        for key in raw:
            if key not in ("name", "merge") and key in STAGE_KEYS:
                problems.add(path + (key,), f"key '{key}': a merge stage has no data, length or training options")
        merge = _parse_merge(raw["merge"], path + ("merge",), problems)
        return Stage(name=name, merge=merge) if merge is not None else None

    datasets = raw.get("datasets")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        problems.add(path + ("datasets",), "key 'datasets': expected a non-empty list of files or folders")
        datasets = []
    for position, entry in enumerate(datasets):
        where = path + ("datasets", position)
        if not isinstance(entry, (str, os.PathLike)) or not str(entry):
            problems.add(where, f"key 'datasets': expected a path, got {entry!r}")
        elif not Path(entry).exists():
            from ark_hf.data.loading import missing_path_hint

            problems.add(where, f"key 'datasets': no such file or folder: {entry}{missing_path_hint(entry)}")
    steps, epochs = raw.get("steps"), raw.get("epochs")
    if (steps is None) == (epochs is None):
        problems.add(path, "give exactly one of 'steps' (optimizer steps) and 'epochs' (passes over the stage's data)")
    if steps is not None and (not _is_int(steps) or steps < 1):
        problems.add(path + ("steps",), f"key 'steps': expected an integer >= 1, got {steps!r}")
    if epochs is not None and (not _is_number(epochs) or epochs <= 0):
        problems.add(path + ("epochs",), f"key 'epochs': expected a number > 0, got {epochs!r}")
    scale = raw.get("learning_rate_scale", 1.0)
    if not _is_number(scale) or scale < 0:
        problems.add(
            path + ("learning_rate_scale",), f"key 'learning_rate_scale': expected a number >= 0, got {scale!r}"
        )
        scale = 1.0
    loss = raw.get("loss") or {}
    if not isinstance(loss, Mapping):
        problems.add(path + ("loss",), f"key 'loss': expected a mapping of loss options, got {type(loss).__name__}")
        loss = {}
    for key, value in loss.items():
        expected = LOSS_OPTION_TYPES.get(key)
        if expected is None:
            problems.add(
                path + ("loss", key),
                f"key '{key}': unknown loss option (expected one of: {', '.join(LOSS_OPTION_TYPES)})",
            )
        elif (expected is bool and not isinstance(value, bool)) or (expected is float and not _is_number(value)):
            problems.add(path + ("loss", key), f"key '{key}': expected {expected.__name__}, got {value!r}")
    group_size = raw.get("train_group_size")
    if group_size is not None and (not _is_int(group_size) or group_size < 1):
        problems.add(
            path + ("train_group_size",), f"key 'train_group_size': expected an integer >= 1, got {group_size!r}"
        )
    instruction = raw.get("query_instruction")
    if instruction is not None and not isinstance(instruction, str):
        problems.add(path + ("query_instruction",), f"key 'query_instruction': expected a string, got {instruction!r}")
    return Stage(
        name=name,
        datasets=tuple(str(entry) for entry in datasets),
        steps=steps if _is_int(steps) else None,
        epochs=float(epochs) if _is_number(epochs) else None,
        learning_rate_scale=float(scale),
        loss=dict(loss),
        train_group_size=group_size,
        query_instruction=instruction,
    )


def parse_stages(raw_stages: Any, source: str = "<stages>", lines: Mapping[tuple, int] | None = None) -> list[Stage]:
    """Check a list of stages (mappings or `Stage`s) and return them; `StagePlanError` lists every problem."""
    problems = _Problems(source, lines or {})
    if not isinstance(raw_stages, (list, tuple)) or not raw_stages:
        problems.add(("stages",), "key 'stages': expected a non-empty list of stages")
        problems.raise_if_any()
    stages = [_parse_stage(raw, index, problems) for index, raw in enumerate(raw_stages)]
    problems.raise_if_any()
    names = [stage.name for stage in stages]
    for index, name in enumerate(names):
        if name in names[:index]:
            problems.add(("stages", index, "name"), f"key 'name': stage name '{name}' is used twice")
    data_stages = [stage for stage in stages if not stage.is_merge]
    if not data_stages:
        problems.add(("stages",), "key 'stages': the plan has no data stage")
    for index, stage in enumerate(stages):
        if not stage.is_merge:
            continue
        if index != len(stages) - 1:
            problems.add(("stages", index, "merge"), "key 'merge': the merge stage must be the last stage")
            continue
        source_name = stage.merge.from_stage
        if source_name is not None and source_name not in [s.name for s in stages[:index] if not s.is_merge]:
            problems.add(
                ("stages", index, "merge", "from_stage"),
                f"key 'from_stage': no data stage named '{source_name}' before the merge"
                f"{did_you_mean(source_name, [s.name for s in stages[:index] if not s.is_merge])}",
            )
    problems.raise_if_any()
    return stages


def _node_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """1-based line of every key and list item of a composed YAML document, by path."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            lines.update(_node_lines(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_node_lines(item, path + (index,)))
    return lines


def load_stage_plan(path: str | os.PathLike) -> list[Stage]:
    """Read and check a stage-plan YAML (see the module docstring for the format).

    Every problem is reported at once, each with the file, the 1-based line and the key:
    `plan.yaml:7: stages[1].lr_scale: key 'lr_scale': unknown key (expected one of: ...)`. Dataset paths
    (relative to the working directory, like `train_data`) must exist; their records are validated when the
    trainer is built. `path` may also name a shipped plan (`qwen3_stages`, see `resolve_config_file`).
    """
    try:
        path = resolve_config_file(path, what="stage plan")
    except ConfigError as error:
        raise StagePlanError(str(error)) from None
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise StagePlanError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from error
    lines = _node_lines(node) if node is not None else {}
    problems = _Problems(str(path), lines)
    if not isinstance(data, Mapping):
        problems.add((), f"expected a mapping with a 'stages' list, got {type(data).__name__}")
        problems.raise_if_any()
    _check_keys(data, PLAN_KEYS, (), problems)
    problems.raise_if_any()
    return parse_stages(data.get("stages"), str(path), lines)


class CurriculumPlan:
    """The geometry of a stage plan once its stages are sized: which optimizer steps belong to which stage.

    Args:
        stages: the parsed plan.
        source: where it came from (a file path), for messages.

    Attributes:
        stage_steps: optimizer steps of each stage (0 for the merge); set by the trainer when it sizes the data.
        merge_steps: global steps of the checkpoints the merge reads.
    """

    def __init__(self, stages: Sequence[Stage], source: str | None = None) -> None:
        self.stages = list(stages)
        self.source = source
        self.stage_steps: list[int] = []
        self.merge_steps: list[int] = []

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CurriculumPlan:
        return cls(load_stage_plan(path), source=str(path))

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
            _, last = self.stage_range(index)
            if step_index < last:
                return index
        return self.data_stages[-1]

    def fingerprint(self, records_per_stage: Sequence[int], args: Any, batch_size: int, seed: int) -> str:
        """Identity of the data stream: a resume is refused when it changes."""
        payload = {
            "stages": [stage.to_dict() for stage in self.stages],
            "records": list(records_per_stage),
            "steps": self.stage_steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def choose_merge_checkpoints(self, args: Any) -> list[int]:
        """Global steps whose checkpoints the merge reads, checked against what the run will save and keep."""
        merge = self.merge_stage.merge
        data_names = [self.stages[i].name for i in self.data_stages]
        source = data_names.index(merge.from_stage) if merge.from_stage else len(data_names) - 1
        first, last = self.stage_range(self.data_stages[source])
        saved = set(self.stage_end_steps)  # the curriculum saves at every stage end
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
