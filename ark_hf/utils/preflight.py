"""Checks that run before any model weights load and before anything is written.

Every way a run can be wrong from the start (a config value, the output directory, the training or
evaluation data, the tokenizer, a weight file, a checkpoint to resume) is checked by `preflight`, cheaply, so the
error comes in seconds and names the file and line or the config key, instead of hours in or never. The checks of
model files (weights, heads, tokenizer, checkpoint, model name) live next to the models, in `ark_hf.models.checks`,
which the models also run as they load; this module holds the config, data and output-directory checks.

```python
from ark_hf import BGETrainer, BGETrainerConfig
from ark_hf.utils.preflight import preflight

config = BGETrainerConfig(output_dir="out/m3", model_name_or_path="BAAI/bge-m3", train_data=["data/"])
records = preflight(config, BGETrainer)  # validated records; the output_dir lock is now held
trainer = BGETrainer(model=None, args=config, train_dataset=records)
```

`BaseRetrieverTrainer.train()` runs the subset that needs the built trainer (`check_before_training`:
zero-step runs, `dataloader_drop_last` with too few records, `metric_for_best_model`, the lock) and, after
training, `check_training_happened` (a run whose every batch was skipped fails).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging

from ark_hf.models.checks import (
    ModelFileError,
    ModelNotFoundError,
    TokenizerError,
    check_checkpoint_matches,
    check_model_exists,
    check_model_folder,
    check_safetensors_file,
    check_tokenizer,
    check_weight_files,
    load_head_state,
    read_json_file,
)
from ark_hf.utils.cli import ConfigError, describe_key, did_you_mean

logger = logging.get_logger(__name__)

__all__ = [
    "ModelFileError",
    "ModelNotFoundError",
    "TokenizerError",
    "check_accelerate_config",
    "check_accelerate_config_file",
    "check_batches",
    "check_before_training",
    "check_checkpoint_matches",
    "check_config_values",
    "check_eval_data",
    "check_metric_for_best_model",
    "check_model_exists",
    "check_model_folder",
    "check_resume_checkpoint",
    "check_safetensors_file",
    "check_tokenizer",
    "check_training_happened",
    "check_weight_files",
    "load_head_state",
    "preflight",
    "read_json_file",
]


# ------------------------------------------------------------------------------------------ config values
def check_config_values(args: Any) -> None:
    """Refuse values that torch or transformers would only reject after the model loads (or never).

    Raises:
        ConfigError: naming the key, e.g. `key 'learning_rate': must be >= 0, got -1e-05`.
    """
    checks = [
        ("learning_rate", lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0"),
        ("per_device_train_batch_size", lambda v: v >= 1, "must be >= 1"),
        ("per_device_eval_batch_size", lambda v: v >= 1, "must be >= 1"),
        ("gradient_accumulation_steps", lambda v: v >= 1, "must be >= 1"),
        ("eval_batch_size_encode", lambda v: v >= 1, "must be >= 1"),
        ("num_train_epochs", lambda v: v >= 0, "must be >= 0"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ]
    for key, ok, rule in checks:
        value = getattr(args, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise ConfigError(f"{describe_key(key)}: {rule}, got {value}")
    check_eval_modes(args)
    max_steps = getattr(args, "max_steps", -1)
    epochs = getattr(args, "num_train_epochs", 1)
    if (max_steps is None or max_steps <= 0) and epochs <= 0 and not getattr(args, "curriculum", None):
        raise ConfigError(
            f"key 'num_train_epochs': {epochs} with max_steps unset trains zero steps; set num_train_epochs > 0 "
            "or max_steps > 0"
        )


def check_eval_modes(args: Any) -> None:
    """Refuse an unknown evaluation mode (with a "did you mean"); warn when `eval_modes` is set without `eval_data`."""
    from ark_hf.evaluation.ir import MODES

    modes = getattr(args, "eval_modes", None)
    if not modes or not hasattr(args, "eval_data"):
        return
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(
                f"key 'eval_modes': unknown evaluation mode '{mode}'{did_you_mean(mode, MODES)}; the modes are "
                f"{', '.join(MODES)}"
            )
    if not args.eval_data and list(modes) != ["dense"]:
        logger.warning(
            "eval_modes=%s has no effect: there is no eval_data to evaluate (set eval_data to a JSON file, a BEIR "
            "folder or training records)",
            list(modes),
        )


def check_batches(num_records: int, args: Any, *, world_size: int | None = None) -> None:
    """With `dataloader_drop_last`, refuse fewer records than one global batch (every batch would be dropped)."""
    world = world_size if world_size is not None else getattr(args, "world_size", 1)
    batch = args.per_device_train_batch_size * world
    if getattr(args, "dataloader_drop_last", False) and num_records < batch:
        raise ConfigError(
            f"key 'dataloader_drop_last': {num_records} training records are fewer than one batch "
            f"(per_device_train_batch_size={args.per_device_train_batch_size} x {world} process(es) = {batch}), "
            "so every batch would be dropped and nothing trained; add data, lower the batch size or turn "
            "dataloader_drop_last off"
        )
    if num_records == 0:
        raise ConfigError("no training records: nothing to train on")


# ------------------------------------------------------------------------------------------ accelerate config
def check_accelerate_config(args: Any, environ: dict[str, str] | None = None) -> None:
    """Refuse an accelerate config (`accelerate launch --config_file F`) this run cannot train under.

    `accelerate launch` exports the config's values as environment variables (not the file's path); they are
    read here, and errors name the config key (and `ACCELERATE_CONFIG_FILE` when set). Refuses: a DeepSpeed config
    when deepspeed is not installed; ZeRO-3 without `zero3_save_16bit_model` (the final save would hold only
    shards: no `model.safetensors`, no head files); FSDP with `use_cpu` (accelerate then runs no FSDP at all);
    with several processes, gradient accumulation and GradCache, a per-process batch that does not split into
    whole mini-batches.

    Raises:
        ConfigError: naming the config key (and the file when known).
    """
    import importlib.util

    env = os.environ if environ is None else environ
    where = env.get("ACCELERATE_CONFIG_FILE") or "the accelerate config"
    flag = lambda name: env.get(name, "false").lower() == "true"  # noqa: E731
    if flag("ACCELERATE_USE_DEEPSPEED"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"{where}: key 'distributed_type: DEEPSPEED' needs the deepspeed package, which is not installed "
                "(pip install deepspeed), or launch with accelerate_configs/multi_gpu.yaml"
            )
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage == "3" and not flag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
            raise ConfigError(
                f"{where}: key 'deepspeed_config.zero3_save_16bit_model' must be true under ZeRO-3: without it the "
                "saved model is only DeepSpeed shards (no model.safetensors, no sparse/ColBERT head files)"
            )
    on_cpu = flag("ACCELERATE_USE_CPU") or getattr(args, "use_cpu", False)
    # accelerate never turns MULTI_CPU into FSDP; the test suite lifts that one refusal to run accelerate's FSDP
    # path over gloo (tests/fsdp_on_cpu/sitecustomize.py, which ARK_HF_FSDP_ON_CPU=1 turns on)
    if flag("ACCELERATE_USE_FSDP") and on_cpu and env.get("ARK_HF_FSDP_ON_CPU") != "1":
        raise ConfigError(
            f"{where}: key 'distributed_type: FSDP' with 'use_cpu' (or the training config's use_cpu): accelerate "
            "runs FSDP only on accelerators; use accelerate_configs/multi_gpu.yaml (DDP) on CPU"
        )
    world = int(env.get("WORLD_SIZE", "1") or 1)
    mini = getattr(args, "mini_batch_size", None)
    batch = getattr(args, "per_device_train_batch_size", 1)
    if mini and world > 1 and getattr(args, "gradient_accumulation_steps", 1) > 1 and batch % mini:
        raise ConfigError(
            f"{where}: key 'num_processes' ({world}) with per_device_train_batch_size={batch}, "
            f"mini_batch_size={mini} and gradient accumulation: each process's batch must split into whole "
            "mini-batches; make per_device_train_batch_size a multiple of mini_batch_size"
        )


def check_accelerate_config_file(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict:
    """Refuse a launch config whose machines cannot meet, before `accelerate launch` starts anything.

    With several machines, `accelerate launch` hands the values to torch's rendezvous. The rendezvous waits for
    every machine before it starts a training process. So a missing `main_process_ip`, or a `machine_rank` that no
    machine can match, waits without end instead of failing, and no check inside training ever runs.
    `python -m ark_hf.launch` calls this first.

    Args:
        path: the accelerate config file (YAML or JSON).
        overrides: values given on the `accelerate launch` command line (`machine_rank`, `num_machines`,
            `num_processes`, `main_process_ip`, `main_process_port`); they win over the file's, as in accelerate.

    Returns:
        The config with the overrides applied.

    Raises:
        ConfigError: naming the file (or the command-line flag) and the key.
    """
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    config = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    config.update(given)

    def where(key: str) -> str:
        return f"--{key} (on the accelerate launch command line)" if key in given else f"{path}: key '{key}'"

    def integer(key: str, default: int) -> int:
        value = default if config.get(key) is None else config[key]
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            raise ConfigError(f"{where(key)} must be a whole number >= 0, got {value!r}")
        return int(value)

    machines = integer("num_machines", 1)
    rank = integer("machine_rank", 0)
    if machines < 1:
        raise ConfigError(f"{where('num_machines')} must be at least 1, got {machines}")
    if rank >= machines:
        raise ConfigError(
            f"{where('machine_rank')} is {rank}, outside num_machines: {machines} (ranks 0 to {machines - 1}): "
            "give each machine its own rank, 0 on the machine at main_process_ip"
        )
    if machines > 1:
        if not str(config.get("main_process_ip") or "").strip():
            raise ConfigError(
                f"{where('main_process_ip')} is missing: with num_machines: {machines} every machine needs the "
                "address of the machine with machine_rank 0 (without it the launch waits without end)"
            )
        integer("main_process_port", 29500)
        processes = integer("num_processes", machines)
        if processes < machines or processes % machines:
            raise ConfigError(
                f"{where('num_processes')} is {processes}: it counts the processes of all machines together, so "
                f"it must be a multiple of num_machines ({machines}), e.g. {machines} x the GPUs of one machine"
            )
    return config


def metric_keys(modes: Iterable[str], name: str = "") -> set[str]:
    """The keys an `IREvaluator` with these modes reports (without the Trainer's `eval_` prefix)."""
    from ark_hf.evaluation.ir import METRICS

    prefix = f"{name}_" if name else ""
    return {f"{prefix}{mode}_{metric}" for mode in modes for metric in METRICS}


def check_metric_for_best_model(args: Any, computed: set[str], *, has_eval_loss: bool = False) -> None:
    """Refuse a `metric_for_best_model` that the evaluation will not compute (it would fail at the first
    evaluation, `eval_steps` into training).

    Args:
        args: the config.
        computed: metric keys the evaluators report (`metric_keys`), without `eval_`.
        has_eval_loss: an `eval_dataset` is evaluated, so `loss` exists too.
    """
    metric = getattr(args, "metric_for_best_model", None)
    evaluates = bool(computed) or has_eval_loss
    if metric is None:
        return
    if not evaluates:
        if getattr(args, "load_best_model_at_end", False):
            raise ConfigError(
                f"key 'metric_for_best_model': '{metric}' with load_best_model_at_end, but there is no evaluation "
                "data (eval_data) to compute it"
            )
        return
    key = metric[len("eval_") :] if metric.startswith("eval_") else metric
    available = set(computed) | ({"loss"} if has_eval_loss else set())
    if key not in available:
        choices = ", ".join(sorted(available)[:12])
        more = "" if len(available) <= 12 else f", ... ({len(available)} in all)"
        hint = did_you_mean(key, available)
        raise ConfigError(
            f"key 'metric_for_best_model': '{metric}' is not computed by the evaluation"
            f" (eval_modes={list(getattr(args, 'eval_modes', []) or [])}){hint}; it reports {choices}{more}"
        )


# ------------------------------------------------------------------------------------------------- data
def check_eval_data(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Read and validate the evaluation set, in any layout `ark_hf.evaluation.data.load_eval_set` recognises."""
    from ark_hf.evaluation.data import load_eval_set

    return load_eval_set(path)


def check_dataset_instructions(records: Sequence[dict], instructions: dict | None) -> None:
    """Refuse `dataset_instructions` keys that match no source of `records` (they would silently never apply)."""
    from ark_hf.data.checks import check_name_keyed_settings

    sources = sorted({str(record.get("source", "")) for record in records})
    check_name_keyed_settings({"dataset_instructions": instructions}, sources)


def check_resume_checkpoint(resume: str, output_dir: str | None) -> None:
    """Refuse a `resume_from_checkpoint` folder that is not a checkpoint (no `trainer_state.json`): the Trainer
    would fail only after the model loaded, or start from the wrong state."""
    folder = Path(resume)
    if not folder.is_dir():
        from ark_hf.data.loading import missing_path_hint

        raise ConfigError(
            f"key 'resume_from_checkpoint': {resume} is not a checkpoint folder{missing_path_hint(folder)}"
        )
    if (folder / "trainer_state.json").is_file():
        return
    found = (
        sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: p.name)
        if output_dir and Path(output_dir).is_dir()
        else []
    )
    inside = sorted(folder.glob("checkpoint-*"), key=lambda p: p.name)
    if inside:
        hint = (
            f"; it holds {', '.join(p.name for p in inside[-3:])}: pass one of those (or resume_from_checkpoint: true)"
        )
    elif found:
        hint = f"; the checkpoints of output_dir are {', '.join(str(p) for p in found[-3:])}"
    else:
        hint = "; a checkpoint is a checkpoint-N folder that a run wrote into its output_dir"
    raise ConfigError(
        f"key 'resume_from_checkpoint': {resume} is not a checkpoint of a run (it has no trainer_state.json){hint}"
    )


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value if isinstance(v, (str, os.PathLike))]


# ------------------------------------------------------------------------------------------- entry points
def preflight(config: Any, trainer_cls: type | None = None) -> list[dict] | None:
    """Every check that needs no model weights, in the order a user would want the errors; then the lock.

    Order: config values, the output directory (lock, emptiness, not inside the model or data folder), the
    checkpoint to resume (a folder with `trainer_state.json`), the name-keyed settings against the data files
    (`ark_hf.data.checks`), the training data (validated; every group fillable; enough for one batch; under a
    curriculum, every stage's data), the
    evaluation data and `metric_for_best_model`, the model's config, tokenizer and weight files, and whether
    the checkpoint belongs to that model. Nothing is written until all pass; then the output directory's lock
    is taken (held until the process exits).

    Args:
        config: a `RetrieverConfig` (`BGETrainerConfig`, `QwenTrainerConfig`).
        trainer_cls: the trainer class whose `load_records` reads the data (teacher-score requirements differ).

    Returns:
        The validated training records (pass them as `train_dataset` so they are not read twice), or `None`
        when the config has no `train_data` (a curriculum validates its own stages).
    """
    from ark_hf.utils.locking import acquire_output_dir_lock, check_output_dir_lock

    check_config_values(config)
    check_accelerate_config(config)
    train_data = _paths(getattr(config, "train_data", None))
    eval_data = getattr(config, "eval_data", None)
    model_path = getattr(config, "model_name_or_path", None)
    resume = getattr(config, "resume_from_checkpoint", None)
    check_output_dir_lock(config.output_dir)
    check_output_dir(
        config.output_dir,
        overwrite=getattr(config, "overwrite_output_dir", False),
        resume_from_checkpoint=resume,
        model_path=model_path,
        data_paths=[*train_data, *_paths(eval_data)],
    )
    # `check_before_training` (the same launch, once the model is built) then checks only the free space
    config._output_dir_checked = str(Path(config.output_dir).resolve())
    if isinstance(resume, str):
        check_resume_checkpoint(resume, config.output_dir)

    from ark_hf.data.checks import check_group_feasibility, check_name_keyed_settings, data_file_names
    from ark_hf.data.loading import load_training_records

    require = trainer_cls.uses_teacher_scores(config) if trainer_cls is not None else False
    max_errors = getattr(config, "max_validation_errors", 20)
    group_size = getattr(config, "train_group_size", 1)
    records = None
    if train_data:
        check_name_keyed_settings(config, data_file_names(train_data))
        records = load_training_records(train_data, require_teacher_scores=require, max_errors=max_errors)
        check_group_feasibility(records, group_size, use_teacher_scores=require)
        check_batches(len(records), config)
    elif getattr(config, "curriculum", None):
        from ark_hf.curriculum.plan import load_stage_plan

        stages = [stage for stage in load_stage_plan(config.curriculum) if not stage.is_merge]
        check_name_keyed_settings(
            config, data_file_names(p for stage in stages for p in stage.datasets), where="the curriculum's stages"
        )
        for stage in stages:  # read here too, so that nothing is written before every stage's data passed
            stage_records = load_training_records(
                list(stage.datasets), require_teacher_scores=require, max_errors=max_errors
            )
            check_group_feasibility(
                stage_records,
                stage.train_group_size or group_size,
                use_teacher_scores=require,
                where=f"stage '{stage.name}'",
            )
    if eval_data:
        check_eval_data(eval_data)
    computed = metric_keys(getattr(config, "eval_modes", ["dense"])) if eval_data else set()
    check_metric_for_best_model(config, computed)
    if model_path:
        model_config = check_model_folder(model_path, trust_remote_code=getattr(config, "trust_remote_code", False))
        if isinstance(resume, str) and model_config is not None:
            check_checkpoint_matches(resume, model_config)
    if config.should_save:
        acquire_output_dir_lock(config.output_dir)
    return records


class _MicroBatchCounter(TrainerCallback):
    """Counts the micro-batches run in one `train()` call (every `training_step`)."""

    def __init__(self) -> None:
        self.micro_batches = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.micro_batches = 0

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.micro_batches += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.micro_batches += 1


def check_before_training(trainer: Any, resume_from_checkpoint: Any = None) -> None:
    """The checks of `preflight` that need the built trainer; called by `BaseRetrieverTrainer.train()`.

    Refuses a zero-step run, `dataloader_drop_last` with fewer records than one batch, a
    `metric_for_best_model` the evaluators will not compute, `dataset_instructions` keys matching no file, an
    `output_dir` equal to or inside the model or data folder and an `output_dir` held by another run; then
    takes the output directory's lock.
    """
    from ark_hf.data.dataset import TrainGroupDataset
    from ark_hf.utils.locking import acquire_output_dir_lock, check_output_dir_lock

    args = trainer.args
    check_config_values(args)
    if args.should_save:
        check_output_dir_lock(args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model_path = getattr(model, "name_or_path", None) or getattr(args, "model_name_or_path", None)
    required_bytes = checkpoint_bytes(model, args) if args.should_save else 0
    checked = args.__dict__.pop("_output_dir_checked", None)  # by `preflight`, earlier in this launch
    if checked is not None and checked == str(Path(args.output_dir).resolve()):
        check_free_space(args.output_dir, required_bytes)
    else:
        check_output_dir(
            args.output_dir,
            overwrite=getattr(args, "overwrite_output_dir", False) or not args.should_save,
            resume_from_checkpoint=resume_from_checkpoint,
            required_bytes=required_bytes,
            model_path=str(model_path) if model_path else None,
            data_paths=[*_paths(getattr(args, "train_data", None)), *_paths(getattr(args, "eval_data", None))],
        )
    dataset = trainer.train_dataset
    if isinstance(dataset, TrainGroupDataset) and getattr(trainer, "curriculum", None) is None:
        from ark_hf.data.checks import check_group_feasibility

        check_dataset_instructions(dataset.records, dataset.dataset_instructions)
        check_group_feasibility(
            dataset.records, dataset.train_group_size, use_teacher_scores=dataset.use_teacher_scores
        )
        check_batches(len(dataset), args, world_size=trainer.accelerator.num_processes)
    computed: set[str] | None = set()
    for evaluator in trainer.evaluators:
        names = getattr(evaluator, "metric_names", None)  # optional part of the Evaluator protocol
        if names is None and hasattr(evaluator, "modes"):
            names = metric_keys(evaluator.modes, getattr(evaluator, "name", ""))
        if names is None:  # an evaluator that does not declare its keys: nothing to check against
            computed = None
            break
        computed |= set(names)
    if computed is not None:
        check_metric_for_best_model(args, computed, has_eval_loss=trainer.eval_dataset is not None)
    if not any(isinstance(c, _MicroBatchCounter) for c in trainer.callback_handler.callbacks):
        trainer.add_callback(_MicroBatchCounter())
    if args.should_save:
        acquire_output_dir_lock(args.output_dir)


def check_training_happened(trainer: Any) -> None:
    """After `train()`: fail when every batch of the run was skipped (`nan_policy='skip'`), so a run that
    trained nothing never looks like a success. Called by `BaseRetrieverTrainer.train()`."""

    counter = next((c for c in trainer.callback_handler.callbacks if isinstance(c, _MicroBatchCounter)), None)
    if counter is None or counter.micro_batches == 0:
        return
    logged = sum(float(entry.get("skipped_batches", 0.0)) for entry in trainer.state.log_history)
    pending = float(trainer._component_sums.get("skipped_batches", 0.0))  # not logged yet
    skipped = logged + pending
    if skipped >= counter.micro_batches:
        raise NonFiniteLossError(
            f"every one of the {counter.micro_batches} batches of this run had a non-finite loss and was skipped "
            f"(nan_policy='skip'): nothing was trained, and checkpoints in {trainer.args.output_dir} hold the "
            f"starting weights. The data read: {_data_read(trainer)}. Lower the learning rate, check that data "
            "(teacher scores, empty texts), or use nan_policy='stop' to see the first bad batch"
        )


def _data_read(trainer: Any) -> str:
    """The data files (or dataset names) a trainer trained on, for messages."""
    stream = getattr(trainer, "curriculum_stream", None)
    if stream is not None:
        datasets = [d for stage in stream.plan.stages for d in stage.datasets]
        if datasets:
            return ", ".join(dict.fromkeys(datasets))
    records = getattr(trainer.train_dataset, "records", None) or []
    sources = list(dict.fromkeys(str(r.get("source")) for r in records if r.get("source") is not None))
    if sources:
        return ", ".join(sources[:10]) + (f", ... ({len(sources)} in all)" if len(sources) > 10 else "")
    train_data = _paths(getattr(trainer.args, "train_data", None))
    return ", ".join(train_data) if train_data else "the train_dataset passed to the trainer"


class OutputDirError(FileExistsError):
    """The output directory holds another run and the caller did not allow overwriting it."""


class NonFiniteLossError(FloatingPointError):
    """A loss or loss component became NaN or infinite."""


def check_output_dir(
    output_dir: str,
    *,
    overwrite: bool,
    resume_from_checkpoint: Any = None,
    required_bytes: int = 0,
    model_path: str | None = None,
    data_paths: Sequence[str] = (),
) -> None:
    """Refuse a non-empty `output_dir` unless overwriting or resuming was asked for; check it is writable and
    that its file system has `required_bytes` free (one checkpoint). An `output_dir` equal to or inside the
    model folder (`model_path`) or a data folder (`data_paths`) is refused even with `overwrite`: the run
    would overwrite the base model, or the next run would read checkpoints as training data.

    Runs before anything is written, so a mistyped path never clobbers a finished model and a full disk
    fails now rather than at the first save, hours in.
    """
    from ark_hf.utils.locking import LOCK_FILE

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {output_dir} exists and is not a directory")
    target = path.resolve()
    for kind, other in [("model folder (model_name_or_path)", model_path)] + [("data folder", p) for p in data_paths]:
        if other and os.path.isdir(other):
            folder = Path(other).resolve()
            if target == folder or folder in target.parents:
                where = "is" if target == folder else "is inside"
                raise OutputDirError(
                    f"output_dir {output_dir} {where} the {kind} {other}; the run would write into it. "
                    "Pick an output_dir outside it"
                )
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if entries and not overwrite and not resume_from_checkpoint:
        entries = entries[:5]
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
    check_free_space(output_dir, required_bytes)


def check_free_space(output_dir: str, required_bytes: int) -> None:
    """Refuse an `output_dir` whose file system has less than `required_bytes` free (one checkpoint)."""
    path = Path(output_dir)
    probe = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
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
    if tokenizer is not None:
        folder = getattr(tokenizer, "name_or_path", None)
        check_tokenizer(tokenizer, vocab_size=vocab, folder=folder if folder and os.path.isdir(folder) else None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has {vocab} rows: "
            "tokenizer and model do not belong together"
        )
