"""Running one script on a CPU, one GPU or many (torchrun / `accelerate launch`, which set RANK,
WORLD_SIZE and LOCAL_RANK): process-group setup, model wrapping (DDP, or FSDP2's fully_shard), the few
collectives the recipes need, and the gather with gradient that contrastive losses use.

Ours rather than accelerate's Accelerator: the recipes need to see the gradient scaler's skipped steps
(mm/precision.py), to save sharded models through torch.distributed.checkpoint (mm/train_state.py) and to
choose per step when gradients synchronise; with those in our hands, what remains is this small file.
`accelerate launch` still works as a launcher.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30) -> Dist:
    """Join the process group the launcher describes (nccl on GPUs, gloo on CPUs), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    rank, world_size = world()
    return Dist(rank, world_size, local_rank, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- model wrapping

def wrap_model(model: torch.nn.Module, d: Dist, parallel: str = "ddp", block_types: Iterable[type] = (),
               forward_methods: Iterable[str] = ()) -> torch.nn.Module:
    """The module the training step calls: the model itself when alone; DDP (ddp); or, for fsdp, the same
    module with its `block_types` submodules and then itself sharded by FSDP2 `fully_shard`, in place.
    `forward_methods` (e.g. encode_image) are methods besides forward that gather the sharded weights too."""
    if d.world_size == 1 and parallel == "ddp":
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        types = tuple(block_types)
        for module in model.modules():
            if types and isinstance(module, types):
                fully_shard(module)
        fully_shard(model)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2), i.e. no rank holds it whole."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (FSDP2 shards in place: the module is the model)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool = True):
    """Accumulate gradients locally (no all-reduce) inside the block when `skip`: every micro-step of a
    gradient-accumulation step but the last."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the DDP module is inside
    if not skip:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------- collectives

def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (a copy; `x` itself alone)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_sum(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-key sums over ranks of a dict of numbers (the same keys on every rank)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable, our own state) as a list in rank order on rank 0; None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` as a list in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank: one decision, taken once (e.g. which checkpoint to resume)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- gather with gradient (contrastive losses)

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
