"""Collectives for a job's ranks, each the identity in a single process (or with no process group).

The loop and the model-parallel losses call these without asking how many processes run: with
no process group every function returns its input, so the same code runs single-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Rows held by every rank, so ranks may hold batches of different sizes (a last batch)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    # all_gather needs equal shapes: pad to the largest rank's rows, then cut the padding off.
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; the backward returns this rank's rows of the summed gradient.

    Each rank's graph only sees its own part of the loss (e.g. the logits of its own class shard),
    so the full gradient of a gathered row is the sum over ranks of their partial gradients.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _all_gather_rows(tensor.contiguous(), sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `tensor` (dim 0, rank order), differentiable; identity in one process.

    The backward sums the incoming gradients across ranks: right when each rank's loss is a
    different part of the objective (the sharded classifier). A loss that every rank computes
    identically from the gathered rows would be counted W times; divide it by the world size.
    """
    if not _active():
        return tensor
    sizes = tuple(_gather_sizes(tensor.shape[0], tensor.device))
    return _AllGatherWithGrad.apply(tensor, sizes)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `tensor` in rank order, without a backward (labels, evaluation)."""
    if not _active():
        return tensor
    return _all_gather_rows(tensor.contiguous(), _gather_sizes(tensor.shape[0], tensor.device))


class _SumOfReplicated(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity.

    Why not torch.distributed.nn.functional.all_reduce: its backward all-reduces (sums) the
    incoming gradients, which is right when every rank's loss is a different term of a sum, but
    our loss is replicated (every rank holds the same L and calls backward), so summing would
    count the gradient W times. With y = sum_r x_r and the same dL/dy on every rank,
    dL/dx_r = dL/dy: the identity.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, for a loss every rank then holds identically (see _SumOfReplicated)."""
    return _SumOfReplicated.apply(tensor) if _active() else tensor



@torch.no_grad()
def _all_reduced(values: torch.Tensor, op: Any) -> torch.Tensor:
    """A copy of `values` all-reduced with `op` over the ranks (the tensor itself in one process)."""
    if not _active():
        return values
    values = values.clone()
    dist.all_reduce(values, op=op)
    return values


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (e.g. its batch's losses), on every rank."""
    return _all_reduced(values, dist.ReduceOp.SUM) / (dist.get_world_size() if _active() else 1)


def max_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over ranks, on every rank; no gradient flows through it."""
    return _all_reduced(values, dist.ReduceOp.MAX)
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
