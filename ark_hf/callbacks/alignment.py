"""`AlignmentCallback`: forward, backward and parameter alignment of the retriever during training.

Every `every_n_steps` optimizer steps it logs, through `trainer.log` (so every `report_to` backend gets them):

- `align/forward`, `align/backward`, `align/parameter`: `ark_hf.evaluation.alignment.AlignmentEvaluator` on
  a fixed probe set scored by `recipes/compute_alignment.py` (mean per-question Spearman of the retriever's
  cosine with S_f, S_b, and the anchor's cosine);
- `align/grad_probe_cos` = cos(g_train, g_probe): the accumulated, clipped training gradient against the
  gradient of a probe loss (InfoNCE over each probe question's candidates, the chunk of highest ARK score S
  as the positive), both over the trainable parameters. Negative: the step works against what the LM
  considers answer-bearing;
- `align/update_grad_cos` = cos(theta_{t+1} - theta_t, -g_train): how closely the optimizer's update follows
  the negative gradient (1 for plain SGD; lower with momentum and Adam's preconditioning).

Distributed: the probe questions are sharded over the processes and the Spearman sums reduced (every process
runs the same number of forward passes, so ZeRO-3 / FSDP parameter gathering works). The gradient
diagnostics run on the main process alone on the unwrapped model (no collective; `p.grad` is already
all-reduced under DDP); under DeepSpeed ZeRO-2/3 and FSDP, whose gradients are partitioned, they are skipped
with one log line. With LoRA the trainable parameters are the adapters, so the diagnostics cover them.

Memory: on a diagnostic step, two float32 copies of the trainable parameters (the gradient and the weights
before the update), freed after the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ark_hf.evaluation.alignment import AlignmentEvaluator

logger = logging.get_logger(__name__)

__all__ = ["AlignmentCallback"]


class AlignmentCallback(TrainerCallback):
    """Logs ARK alignment scores and gradient diagnostics every `every_n_steps` steps.

    Args:
        probe: an `AlignmentEvaluator`, scored records, or the path of a scored jsonl.
        every_n_steps: the period in optimizer steps (also logged at step 0 when `log_at_start`).
        anchor: `"initial"` measures `align/parameter` against the model at the start of training; `"stored"`
            against the S_v stored in the probe (the base retriever that scored it).
        gradient_diagnostics: compute `align/grad_probe_cos` and `align/update_grad_cos`.
        gradient_probe_size: probe questions in the probe loss.
        temperature: of the probe loss; default: the trainer's `temperature` (else 0.02).
        log_at_start: also log the scores before the first step.
        evaluator_kwargs: encoding settings for the `AlignmentEvaluator` built from records or a path; by
            default the trainer's `query_max_len`, `passage_max_len` and query instruction.

    Example:
        ```python
        trainer = QwenTrainer(config=config)
        trainer.add_callback(AlignmentCallback("probe.align.jsonl", every_n_steps=50).bind(trainer))
        trainer.train()
        ```
    """

    def __init__(
        self,
        probe: AlignmentEvaluator | Sequence[dict] | str | Path,
        *,
        every_n_steps: int = 50,
        anchor: str = "initial",
        gradient_diagnostics: bool = True,
        gradient_probe_size: int = 32,
        temperature: float | None = None,
        log_at_start: bool = False,
        evaluator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if anchor not in ("initial", "stored"):
            raise ValueError(f"anchor must be 'initial' or 'stored', got {anchor!r}")
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.anchor = anchor
        self.gradient_diagnostics = gradient_diagnostics
        self.gradient_probe_size = gradient_probe_size
        self.temperature = temperature
        self.log_at_start = log_at_start
        self.evaluator_kwargs = evaluator_kwargs or {}
        self.trainer: Any = None
        self.evaluator: AlignmentEvaluator | None = None
        self._pending: dict[str, float] = {}
        self._saved: tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor]] | None = None

    def bind(self, trainer: Any) -> AlignmentCallback:
        """Give the callback the trainer it logs through; returns the callback."""
        self.trainer = trainer
        return self

    # ---------------------------------------------------------------------------------------------- setup
    def _build_evaluator(self, args: TrainingArguments) -> AlignmentEvaluator:
        if isinstance(self.probe, AlignmentEvaluator):
            return self.probe
        kwargs = {
            "query_max_len": getattr(args, "query_max_len", 64),
            "passage_max_len": getattr(args, "passage_max_len", 256),
            "query_instruction": getattr(args, "query_instruction", None),
            "query_instruction_format": getattr(args, "query_instruction_format", "{}{}"),
            **self.evaluator_kwargs,
        }
        return AlignmentEvaluator(self.probe, **kwargs)

    def _gradients_available(self) -> bool:
        trainer = self.trainer
        if getattr(trainer, "is_fsdp_enabled", False):
            return False
        if getattr(trainer, "is_deepspeed_enabled", False):
            plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
            return getattr(plugin, "zero_stage", 3) < 2
        return True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if self.trainer is None:
            raise RuntimeError(
                "AlignmentCallback needs its trainer: trainer.add_callback(AlignmentCallback(...).bind(trainer))"
            )
        self.evaluator = self._build_evaluator(args)
        if self.anchor == "initial":
            self.evaluator.set_anchor(self._unwrapped(model))
        if self.gradient_diagnostics and not self._gradients_available():
            logger.warning(
                "AlignmentCallback: gradients are partitioned (DeepSpeed ZeRO-2/3 or FSDP); the gradient "
                "diagnostics are skipped, the alignment scores are still logged"
            )
            self.gradient_diagnostics = False
        if self.log_at_start and state.global_step == 0:
            self._log(self._scores(model), state)

    def _unwrapped(self, model: Any) -> Any:
        return self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)

    def _due(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0

    # ----------------------------------------------------------------------------------------- gradients
    def _probe_loss(self, model: Any, args: TrainingArguments) -> torch.Tensor:
        evaluator = self.evaluator
        indices = [i for i in range(len(evaluator)) if len(evaluator.chunks[i]) > 1][: self.gradient_probe_size]
        scores = evaluator.retriever_scores(model, indices)
        temperature = self.temperature or getattr(args, "temperature", None) or 0.02
        losses = []
        for s, i in zip(scores, indices):
            target = max(range(len(s)), key=lambda j: evaluator.combined[i][j])
            losses.append(F.cross_entropy((s / temperature).unsqueeze(0), torch.tensor([target], device=s.device)))
        return torch.stack(losses).mean()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not (self.gradient_diagnostics and self._due(state.global_step + 1) and state.is_world_process_zero):
            return
        module = self._unwrapped(model)
        params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        train_grads = [p.grad.detach().float().clone() for p in params]
        was_training = module.training
        module.eval()  # no dropout; p.grad is left untouched by autograd.grad
        try:
            with torch.enable_grad():
                loss = self._probe_loss(module, args)
                probe_grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            module.train(was_training)
        dot = sum(float((g * h.float()).sum()) for g, h in zip(train_grads, probe_grads) if h is not None)
        norm_g = math.sqrt(sum(float(g.pow(2).sum()) for g in train_grads))
        norm_h = math.sqrt(sum(float(h.float().pow(2).sum()) for h in probe_grads if h is not None))
        self._pending["align/grad_probe_cos"] = dot / (norm_g * norm_h) if norm_g and norm_h else float("nan")
        self._saved = (params, train_grads, [p.detach().float().clone() for p in params])

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._saved is None:
            return
        params, grads, before = self._saved
        self._saved = None
        dot = norm_u = norm_g = 0.0
        for p, g, b in zip(params, grads, before):
            update = p.detach().float() - b
            dot -= float((update * g).sum())
            norm_u += float(update.pow(2).sum())
            norm_g += float(g.pow(2).sum())
        if norm_u and norm_g:
            self._pending["align/update_grad_cos"] = dot / math.sqrt(norm_u * norm_g)

    # ---------------------------------------------------------------------------------------------- scores
    def _scores(self, model: Any) -> dict[str, float]:
        trainer = self.trainer
        module = self._unwrapped(model)
        world, rank = trainer.args.world_size, trainer.args.process_index
        sums = self.evaluator.spearman_sums(module, rank, world)
        keys = sorted(sums)
        totals = torch.tensor([[sums[k][0], float(sums[k][1])] for k in keys], dtype=torch.float64)
        if world > 1:
            totals = trainer.accelerator.reduce(totals.to(trainer.args.device), reduction="sum").cpu()
        return {f"align/{k}": float(t[0] / t[1]) if t[1] else float("nan") for k, t in zip(keys, totals)}

    def _log(self, metrics: dict[str, float], state: TrainerState) -> None:
        # every process logs (the history stays identical); the report_to backends write on the main one
        self.trainer.log(metrics)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._due(state.global_step):
            return
        metrics = self._scores(model)
        metrics.update(self._pending)
        self._pending = {}
        self._log(metrics, state)
