"""GradCache: contrastive batches far beyond memory, for every head, around any `RetrievalLoss`.

The loss of a contrastive batch couples every query with every passage, so the batch cannot simply be split
into gradient-accumulation steps (that would drop the negatives of the other splits). GradCache (Gao et al.,
2021) separates the encoder from the loss:

1. embed the batch in mini-batches without autograd, keeping each head's outputs (dense vectors, sparse token
   weights with their ids, ColBERT token vectors with masks, decoder last-token vectors) and the RNG state
   before each mini-batch;
2. run the wrapped loss once on the whole set of embeddings, made leaves, and take the gradient of the loss
   with respect to each of them (the cache);
3. embed each mini-batch again with autograd, under the RNG state of step 1 (the same dropout masks), and
   backpropagate `sum(embedding * cached gradient)`, whose parameter gradient is exactly the mini-batch's share
   of the full-batch gradient.

Memory: the encoder's activations of one mini-batch, plus the cached outputs of the whole batch and their
gradients: per text `d` floats (dense), `2 L` (sparse ids and weights), `L d_colbert` (ColBERT vectors; by far
the largest: 256 tokens x 1024 dims x 2 bytes = 0.5 MiB a passage in bf16). Time: one extra forward of the
batch, about 1.33x an uncached step (the same as activation checkpointing, with which it composes).

Exactness: the parameter gradients equal the uncached ones (tests: float64 to 1e-8, with dropout, gradient
checkpointing, LoRA, teacher distillation, Matryoshka, the false-negative mask, and cross-device negatives,
whose gathers run inside step 2). sentence-transformers' CachedMNRL caches dense vectors only; FlagEmbedding and
ms-swift have no gradient cache.

Reference: Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021 (arXiv:2101.06983).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import fields, replace

import torch
from torch import Tensor

from ark_hf.losses.base import LossOutput
from ark_hf.models.outputs import EmbeddingOutput

__all__ = ["BackwardHooks", "GradCache", "chunk_features"]

# head outputs that carry gradient (the others, token ids and masks, are integer bookkeeping)
DIFFERENTIABLE_FIELDS = ("dense", "sparse_weights", "colbert")


def chunk_features(features: dict[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    """Row slices of a tokenized batch (`input_ids`, `attention_mask`, ...), `size` texts at a time.

    Entries that are not per-row tensors (the collator's whole-batch packing index) are left out: a slice packs
    its own rows.
    """
    rows = {key: value for key, value in features.items() if isinstance(value, Tensor)}
    n = next(iter(rows.values())).size(0)
    for start in range(0, n, size):
        yield {key: value[start : start + size] for key, value in rows.items()}


class _RandomState:
    """The CPU and (when used) CUDA generator states, to replay a forward pass with the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _concat(outputs: list[EmbeddingOutput]) -> EmbeddingOutput:
    merged = {}
    for field in fields(EmbeddingOutput):
        values = [getattr(output, field.name) for output in outputs]
        if values[0] is not None:
            merged[field.name] = torch.cat(values, dim=0)
    return EmbeddingOutput(**merged)


def _as_leaves(output: EmbeddingOutput) -> EmbeddingOutput:
    leaves = {}
    for field in fields(EmbeddingOutput):
        value = getattr(output, field.name)
        if value is not None:
            value = value.detach()
            if field.name in DIFFERENTIABLE_FIELDS and value.is_floating_point():
                value.requires_grad_(True)
            leaves[field.name] = value
    return EmbeddingOutput(**leaves)


def _leaf_tensors(output: EmbeddingOutput) -> list[tuple[str, Tensor]]:
    return [(name, getattr(output, name)) for name in DIFFERENTIABLE_FIELDS if getattr(output, name) is not None
            and getattr(output, name).requires_grad]  # fmt: skip


class BackwardHooks:
    """How a cached step's several backwards reach the parameters (plain autograd here).

    A step runs one backward per mini-batch; a distributed engine must reduce the gradients once, after the
    last. `no_sync()` wraps every mini-batch but the last (DDP/FSDP suspend their all-reduce there), and
    `backward(loss, last=...)` runs each backward, told whether it is the step's last (DeepSpeed sets its
    accumulation boundary from it). `ark_hf.trainer.engines.backward_hooks` gives the trainer's engine's.
    """

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, *, last: bool) -> None:
        loss.backward()


class _CallableHooks(BackwardHooks):
    def __init__(self, backward: Callable[[Tensor], None], no_sync: Callable[[], contextlib.AbstractContextManager]):
        self._backward, self._no_sync = backward, no_sync

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self._no_sync()

    def backward(self, loss: Tensor, *, last: bool) -> None:
        self._backward(loss)


class GradCache:
    """The two-pass engine. One instance per trainer; `mini_batch_size` texts per forward pass.

    Args:
        mini_batch_size: texts per encoder call, for queries and passages alike (the batch of a step is
            unchanged; only how much of it is in memory at once).

    `step(...)` runs one training step's forward and backward and returns the loss's `LossOutput` (its loss
    already detached from the encoder). The caller supplies how to encode, how to compute the loss on the full
    set of embeddings, how to backpropagate (the trainer's `accelerator.backward`) and how to suspend gradient
    synchronisation (DDP's `no_sync`) for all but the last backward of the step.
    """

    def __init__(self, mini_batch_size: int) -> None:
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.mini_batch_size = int(mini_batch_size)

    def step(
        self,
        encode: Callable[[dict[str, Tensor]], EmbeddingOutput],
        query_features: dict[str, Tensor],
        passage_features: dict[str, Tensor],
        compute_loss: Callable[[EmbeddingOutput, EmbeddingOutput], LossOutput],
        backward: Callable[[Tensor], None] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        loss_scale: float = 1.0,
        check: Callable[[LossOutput], None] | None = None,
        hooks: BackwardHooks | None = None,
    ) -> LossOutput:
        """One cached forward/backward.

        Args:
            encode: features of some texts -> their `EmbeddingOutput` (one model call).
            query_features, passage_features: the step's tokenized queries and passages.
            compute_loss: `(query_embeddings, passage_embeddings) -> LossOutput` on the full sets.
            backward: backpropagates a scalar through the encoder (e.g. `accelerator.backward`).
            no_sync: a context in which a backward does not synchronise gradients across processes.
            loss_scale: the cached gradients are those of `loss * loss_scale` (1 / gradient accumulation steps).
            check: called with the loss output before any backward (the NaN guard); may raise to skip the step.
            hooks: a `BackwardHooks` (an engine's backward and `no_sync`), in place of `backward`/`no_sync`.
        """
        if hooks is None:
            hooks = _CallableHooks(backward, no_sync) if backward is not None else BackwardHooks()
        chunks = [("q", c) for c in chunk_features(query_features, self.mini_batch_size)]
        chunks += [("p", c) for c in chunk_features(passage_features, self.mini_batch_size)]
        device = next(iter(query_features.values())).device
        states, outputs = [], {"q": [], "p": []}
        with torch.no_grad():
            for role, chunk in chunks:
                states.append(_RandomState(device))
                outputs[role].append(encode(chunk))
        after_first_pass = _RandomState(device)
        query, passages = _as_leaves(_concat(outputs["q"])), _as_leaves(_concat(outputs["p"]))
        del outputs
        with torch.enable_grad():
            output = compute_loss(query, passages)
        if check is not None:
            check(output)
        leaves = _leaf_tensors(query) + _leaf_tensors(passages)
        grads = torch.autograd.grad(output.loss * loss_scale, [tensor for _, tensor in leaves], allow_unused=True)
        cached = {"q": {}, "p": {}}
        for (name, _), grad, role in zip(leaves, grads, ["q"] * len(_leaf_tensors(query)) + ["p"] * len(leaves)):
            if grad is not None:
                cached[role][name] = grad
        offsets = {"q": 0, "p": 0}
        # the last mini-batch with a gradient to pass on: the engine synchronises (and steps) after it
        last = max((i for i, (role, _) in enumerate(chunks) if cached[role]), default=len(chunks) - 1)
        for index, ((role, chunk), state) in enumerate(zip(chunks, states)):
            n = next(iter(chunk.values())).size(0)
            start = offsets[role]
            offsets[role] += n
            if index > last:
                continue
            state.restore()
            with hooks.no_sync() if index < last else contextlib.nullcontext():
                embedded = encode(chunk)
                surrogate = sum(
                    (getattr(embedded, name) * grad[start : start + n].to(getattr(embedded, name).dtype)).sum()
                    for name, grad in cached[role].items()
                )
                if torch.is_tensor(surrogate) and surrogate.requires_grad:
                    hooks.backward(surrogate, last=index == last)
        after_first_pass.restore()
        return replace(output, loss=output.loss.detach())
