"""The one recipe runner: parse -> check -> evaluate -> train -> save -> evaluate -> metrics and card -> push.

Both recipes (`ark_hf.recipes.bge_m3`, `ark_hf.recipes.qwen3_embedding`) and the command-line tool call `run_recipe`
with their trainer class, so every launch path checks the same things in the same order: configuration, data and
output directory first, model weights last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from transformers.utils import logging

from ark_hf.hub import check_hub_push, write_model_card
from ark_hf.trainer.base import BaseRetrieverTrainer
from ark_hf.utils.cli import parse_config
from ark_hf.utils.preflight import preflight

logger = logging.get_logger(__name__)

__all__ = ["format_metrics_table", "run_recipe"]


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric (`dense_ndcg@10`, ...), one column per phase (before, after, ...)."""
    phases = [phase for phase, values in metrics.items() if values]
    keys = sorted({key for phase in phases for key in metrics[phase] if key.startswith("eval_") and "runtime" not in key
                   and "per_second" not in key})  # fmt: skip
    if not keys:
        return ""
    width = max(len(key) for key in keys) - len("eval_")
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{phase:>8}" for phase in phases)]
    for key in keys:
        cells = "  ".join(f"{metrics[phase][key]:>8.4f}" if key in metrics[phase] else f"{'':>8}" for phase in phases)
        lines.append(f"{key.removeprefix('eval_'):<{width}}  {cells}")
    return "\n".join(lines)


def run_recipe(
    trainer_class: type[BaseRetrieverTrainer],
    argv: list[str] | None = None,
    *,
    after_training: Callable[[BaseRetrieverTrainer, dict], None] | None = None,
) -> dict[str, Any]:
    """Run a recipe end to end and return `{"before": ..., "after": ..., ...}` evaluation metrics.

    Args:
        trainer_class: `BGETrainer`, `QwenTrainer` or a subclass; its `config_class` is parsed from `argv`
            (`--config FILE.yaml` plus command-line overrides).
        argv: command-line arguments (default `sys.argv[1:]`).
        after_training: called with the trainer and the metrics after the final evaluation (e.g. to evaluate a
            curriculum's merged model); may add entries to the metrics.
    """
    config = parse_config(trainer_class.config_class, argv)
    if not config.train_data and not config.curriculum:
        raise SystemExit(
            "no training data: --train_data FILE [FILE ...] or --curriculum PLAN.yaml (or in the YAML config)"
        )
    # everything that can fail is checked before the model loads or anything is written: config values, output
    # dir (and its lock), data, eval data, metric_for_best_model, the model's tokenizer and weight files
    check_hub_push(config)  # offline or no token: one line now, not after training
    records = preflight(config, trainer_class)
    trainer = trainer_class(args=config, train_dataset=records)
    for evaluator in trainer.evaluators:  # evaluation encode bars follow the Trainer's (disable_tqdm, main process)
        if getattr(evaluator, "show_progress_bar", False) is None:
            evaluator.show_progress_bar = not config.disable_tqdm and trainer.is_local_process_zero()
    metrics: dict[str, Any] = {}
    if trainer.evaluators:
        metrics["before"] = trainer.evaluate()
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.evaluators:
        metrics["after"] = trainer.evaluate()
    if after_training is not None:
        after_training(trainer, metrics)
    trainer.save_retrieval_metrics(metrics)
    if metrics.get("after") and trainer.is_world_process_zero():
        write_model_card(
            trainer, config.output_dir, log_pooling_note=False
        )  # the card saved with the model lacks the final evaluation
    table = format_metrics_table(metrics)
    if table and trainer.is_world_process_zero():
        print(f"\nRetrieval metrics ({os.path.join(config.output_dir, 'retrieval_metrics.json')}):\n{table}")
    if config.push_to_hub:
        trainer.push_to_hub()
    return metrics
