"""The evaluator protocol: anything that scores a model and returns named metrics.

`BaseRetrieverTrainer.evaluate()` calls every evaluator it was given with the unwrapped model and logs the
returned metrics with the `eval_` prefix, so each key can be a `metric_for_best_model`. `IREvaluator`
(retrieval metrics per scoring mode) and the alignment evaluator satisfy it; a user's evaluator is any
callable with this shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["Evaluator", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """The model in eval mode for the block (no dropout), its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@runtime_checkable
class Evaluator(Protocol):
    """`evaluator(model) -> {"metric_name": value}`; keys get the trainer's `eval_` prefix when logged.

    Example:
        ```python
        class MeanNormEvaluator:
            def __call__(self, model) -> dict[str, float]:
                vectors = model.encode(["a query"], max_length=32)["dense"]
                return {"mean_norm": float(vectors.norm(dim=-1).mean())}
        ```
    """

    def __call__(self, model: Any) -> dict[str, float]: ...


# An evaluator may also declare `metric_names` (the keys it returns, without `eval_`); trainers then check
# `metric_for_best_model` against them before training instead of at the first evaluation.
