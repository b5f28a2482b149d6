"""AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch

# Learned position and class tokens are embeddings by role, though stored as bare Parameters (ndim 2)
# rather than in nn.Embedding; matched on the parameter's own name, never a substring of its path
# ("embed" in a path would also exempt patch_embed.proj.weight, a real weight matrix).
EMBEDDING_PARAM_NAMES = {"positional_embedding", "pos_embed", "class_embedding", "cls_token", "cls_emb",
                         "logit_scale", "logit_bias"}


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameter names exempt from weight decay, by role:
    - tensors of fewer than 2 dims (biases, norm scales, the logit scale and bias);
    - the weights of embedding modules (nn.Embedding, nn.EmbeddingBag);
    - what a module declares in `no_weight_decay()` (the timm / open_clip convention);
    - learned position and class tokens (EMBEDDING_PARAM_NAMES)."""
    names = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            names |= {prefix + n for n in own}
        names |= {prefix + n for n in own if n in EMBEDDING_PARAM_NAMES}
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {prefix + n for n in declared()}
    return names | {n for n, p in model.named_parameters() if p.ndim < 2}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed weight matrices, everything else at weight_decay 0] for AdamW (trainable parameters only)."""
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
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
