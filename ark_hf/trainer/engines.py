"""How a GradCache step's several backwards go through the engine accelerate prepared (DDP, DeepSpeed, FSDP).

A cached step (`ark_hf.losses.cached.GradCache`) runs one backward per mini-batch, and all of them belong to
one optimizer step: the engine must reduce (and, for DeepSpeed, scale, partition and step) once, after the last.

- DDP, FSDP (1 and 2), one device: `accelerator.no_sync(model)` around every mini-batch but the last (DDP's
  and FSDP1's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`), then `accelerator.backward` each time.
- DeepSpeed (ZeRO 0-3): every mini-batch's backward is `engine.backward(loss, scale_wrt_gas=False)`, so ZeRO's
  gradient hooks and its reduce epilogue run each time (ZeRO-2/3 refuse a second backward that skips them:
  "Gradient computed twice for this partition"); the accumulation boundary is `False` for all but the last,
  whose backward goes through `accelerator.backward`, which sets the boundary from `sync_gradients` and calls
  `engine.step()` once at the end of the optimizer step. `scale_wrt_gas=False` because the cached gradients are
  already those of `loss / gradient_accumulation_steps` (as `Trainer.training_step` does).

```python
hooks = backward_hooks(trainer.accelerator, model)
output = grad_cache.step(..., hooks=hooks)
```
"""

from __future__ import annotations

import contextlib

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ark_hf.losses.cached import BackwardHooks

__all__ = ["AcceleratorHooks", "DeepSpeedHooks", "backward_hooks"]


class AcceleratorHooks(BackwardHooks):
    """DDP / FSDP / one device: no gradient synchronisation until the step's last backward."""

    def __init__(self, accelerator: Accelerator, model: nn.Module) -> None:
        self.accelerator, self.model = accelerator, model

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: Tensor, *, last: bool) -> None:
        self.accelerator.backward(loss)


class DeepSpeedHooks(BackwardHooks):
    """DeepSpeed: each backward through the engine, accumulation boundary (and `engine.step`) on the last only."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def backward(self, loss: Tensor, *, last: bool) -> None:
        if last:  # boundary = sync_gradients, then engine.step() (a no-op inside DeepSpeed off the boundary)
            self.accelerator.backward(loss, scale_wrt_gas=False)
            return
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=False)
        engine.backward(loss, scale_wrt_gas=False)


def backward_hooks(accelerator: Accelerator, model: nn.Module) -> BackwardHooks:
    """The `BackwardHooks` for the engine `accelerator` runs `model` under (the model as the Trainer wrapped it)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedHooks(accelerator)
    return AcceleratorHooks(accelerator, model)
