"""AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch

_NO_DECAY_WORDS = ("bias", "norm", "ln_", "ln.", "bn", "embed", "logit_scale", "logit_bias", "class_embedding")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: not to norms, biases, embeddings or the logit scale/bias."""
    return param.ndim >= 2 and not any(w in name for w in _NO_DECAY_WORDS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR multiplier: linear 0->1 over `warmup` steps, then cosine 1->`min_ratio` at `total` steps.
    A class, not a lambda, so the scheduler's state_dict round-trips through a checkpoint."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
