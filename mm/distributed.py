"""Helpers for running the same script on CPU, one GPU, or many (accelerate / torchrun)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] on each rank -> [world*B, D] on every rank, rank order, with gradient flowing back to
    each rank's own slice (the backward sums the gradients from every rank: a reduce-scatter)."""
    _, n = world()
    if n == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)
