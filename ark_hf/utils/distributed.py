"""Collectives for contrastive losses over several processes (DDP, DeepSpeed, FSDP).

In-batch negatives get better with more candidates, so losses can score their local queries against the
passages of every rank. The gather must be differentiable: rank r's loss depends on rank s's passages,
and that gradient has to reach rank s, which owns the activations that produced them. The usual shortcut
(gather without grad, put the local tensor back into its slot, as FlagEmbedding and ms-swift do) drops
those cross-rank gradients; each rank then has to compute the *global* loss for the gradients to be
complete, and the DDP average divides them by the world size.

Every function here is the identity (or a no-op) when `torch.distributed` is not initialised, so the
same loss code runs in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group, 1 without `torch.distributed`."""
    return dist.get_world_size() if _is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without `torch.distributed`."""
    return dist.get_rank() if _is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """`all_gather` along dim 0 whose backward returns to each rank the gradient of its own slice.

    Every rank's loss may depend on every slice, so the gradient of slice r is the *sum* over ranks of
    the gradients of their losses w.r.t. that slice: an all-reduce of the full gradient, then the own
    slice. (A reduce-scatter would move less data, but gloo lacks it; the tensors gathered here are
    embeddings, so the difference is small.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rank = dist.get_rank()
        ctx.local_size = tensor.size(0)
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        # Clone: the incoming gradient may be shared with other nodes of the graph, all_reduce is in place.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate along dim 0 the tensors of all ranks, keeping gradients across ranks.

    Args:
        t: this rank's tensor; every rank must pass the same shape.

    Returns:
        `[world_size * t.size(0), ...]`, rank r's slice at rows `r * t.size(0) ...`. In backward, the
        gradient of each slice (summed over the losses of all ranks) flows to the rank that owns it, so
        after DDP averages parameter gradients the result equals the single-process gradient of the mean
        of the per-rank losses. `t` itself when not distributed.
    """
    if world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


@torch.no_grad()
def all_gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate along dim 0 the tensors of all ranks (same shape on every rank), without autograd.

    For values that carry no gradient: teacher scores, content hashes, sizes. Returns `t.detach()` when
    not distributed.
    """
    if world_size() == 1:
        return t.detach()
    t = t.contiguous()
    gathered = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(gathered, t)
    return torch.cat(gathered, dim=0)


def all_gather_padded(t: Tensor, dim: int = 1, pad_value: float | int = 0, with_grad: bool = True) -> Tensor:
    """Gather tensors whose size along `dim` differs between ranks (e.g. token-level outputs).

    Each rank's tensor is padded at the end of `dim` with `pad_value` to the largest size across ranks,
    then gathered along dim 0. Pad masks and ids the same way (with `pad_value=0`) to know which
    positions are real.

    Args:
        t: this rank's tensor; all dimensions other than `dim` must match across ranks.
        dim: the dimension that may differ.
        pad_value: value of the padded positions.
        with_grad: gather with `all_gather_with_grad` (padding is differentiable: padded positions get no
            gradient) or `all_gather_no_grad`.
    """
    if world_size() == 1:
        return t if with_grad else t.detach()
    dim = dim % t.dim()
    sizes = all_gather_no_grad(torch.tensor([t.size(dim)], device=t.device))
    missing = int(sizes.max()) - t.size(dim)
    if missing > 0:
        pad_shape = list(t.shape)
        pad_shape[dim] = missing
        t = torch.cat([t, t.new_full(pad_shape, pad_value)], dim=dim)
    return all_gather_with_grad(t) if with_grad else all_gather_no_grad(t)
