"""`AtomicSaveMixin`: the only place where ark_hf overrides private `transformers.Trainer` methods.

What it changes and why:
- `_save_checkpoint`: the checkpoint is written into `.tmp-checkpoint-N`, fsynced, then renamed to
  `checkpoint-N`, so a process killed mid-save leaves the previous checkpoint the latest complete one; rotation
  (`save_total_limit`) runs only after the new checkpoint is in place.
- `save_model` (public, but its `_internal_call` protocol is private): the final model is written into
  `.tmp-model`, fsynced, then each file renamed into place, so no file in `output_dir` is ever half-written.
- `_save`: saving goes through the model's own `save_pretrained` (backbone, heads, sentence-transformers files).
- `_load_from_checkpoint`, `_load_best_model`: loading goes through the model's `load_weights_from` (heads and
  adapters included), except under DeepSpeed/FSDP, where the engines load their own shards.
- `_load_callback_state`: the curriculum and hard-negative callbacks stay the instances the trainer bound.

These overrides follow the code of the transformers version in `PINNED_TRANSFORMERS`; `OVERRIDDEN_SOURCE_HASHES`
holds a hash of each overridden method's source there, and `tests/test_atomic_save.py` fails loudly when an
installed transformers changes one, so a reviewer re-reads the override before it silently diverges.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "OVERRIDDEN_SOURCE_HASHES",
    "PINNED_TRANSFORMERS",
    "TMP_PREFIX",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "AtomicSaveMixin",
    "fsync_dir",
    "fsync_tree",
    "source_hash",
]

TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
TMP_PREFIX = ".tmp-"
PINNED_TRANSFORMERS = "5.23.0"
# `source_hash(Trainer.<name>)` under transformers PINNED_TRANSFORMERS, for every method overridden here
OVERRIDDEN_SOURCE_HASHES: dict[str, str] = {
    "_save": "afb0383717a14642",
    "save_model": "204eccaa3554118c",
    "_save_checkpoint": "21c3f319fcef94b3",
    "_load_from_checkpoint": "d7a7ff5e34ce4fe1",
    "_load_best_model": "3e7f8e193937e12a",
    "_load_callback_state": "858d5fb6688ef06c",
}


def source_hash(method: Any) -> str:
    """A short hash of a function's source, blind to indentation and blank lines."""
    lines = [line.strip() for line in inspect.getsource(method).splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


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


class AtomicSaveMixin:
    """Mixed into `BaseRetrieverTrainer` before `transformers.Trainer` (see the module docstring)."""

    def after_final_save(self, output_dir: str) -> None:
        """Called on the main process once a final save is in place (the model card goes here)."""

    def save_pretrained_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the model's `save_pretrained` (a trainer hook)."""
        return {}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Under FSDP the Trainer calls `_save` on every rank after gathering the full state dict, which only rank 0
        # holds (the others get `{}`); a non-writer rank would write the sharded heads over rank 0's files.
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_kwargs: dict[str, Any] = self.save_pretrained_kwargs()
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
            return Trainer.save_model(self, output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tmp_dir = os.path.join(output_dir, TMP_PREFIX + "model")
        if self.args.should_save and os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
        self.accelerator.wait_for_everyone()
        Trainer.save_model(self, tmp_dir, _internal_call=True)
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
            self.after_final_save(output_dir)
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
            return Trainer._load_from_checkpoint(self, resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return Trainer._load_best_model(self)
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        self.accelerator.unwrap_model(self.model).load_weights_from(best)

    def _load_callback_state(self) -> None:
        # With restore_callback_states_from_checkpoint the Trainer rebuilds stateful callbacks from their saved
        # arguments; the curriculum's state is a function of the global step and the hard-negative refresh restores
        # its own from the state at on_train_begin, so keep the bound instances.
        Trainer._load_callback_state(self)
        for bound in (getattr(self, "curriculum", None), getattr(self, "negative_refresh", None)):
            if bound is not None:
                self.callback_handler.remove_callback(type(bound))
                self.callback_handler.add_callback(bound)
