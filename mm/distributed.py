"""Helpers for running the same script on CPU, one GPU, or many (accelerate / torchrun)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    # Ours because torch.distributed.nn.functional.all_gather is deprecated and its suggested
    # replacement keeps autograd in a private module. Works with gloo (CPU) and nccl alike.
    @staticmethod
    def forward(ctx, x):
        _, n = world()
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        rank, n = world()
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows: sum their gradients
        b = grad.shape[0] // n
        return grad[rank * b:(rank + 1) * b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] on each rank (same B everywhere) -> [world*B, D] on every rank, in rank order, with
    gradient flowing back to each rank's own slice."""
    _, n = world()
    return x if n == 1 else _GatherWithGrad.apply(x)
