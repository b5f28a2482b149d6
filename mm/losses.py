"""Contrastive losses as functions of tensors. Features are gathered across ranks with gradient
(open_clip's `local_loss=True, gather_with_grad=True`): each rank scores its own rows against the
whole global batch, so loss and gradients on N ranks equal one rank with the same global batch,
at O(B_local x B_global) memory instead of O(B_global^2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.distributed import gather_with_grad, world


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE. Features [B_local, D], L2-normalised; logit_scale: a scalar, already exp()'d.

    Returns this rank's mean over its rows; averaging over ranks (as DDP does with gradients) gives
    the single-process loss on the global batch.
    """
    rank, _ = world()
    all_image, all_text = gather_with_grad(image_features), gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_text.T  # [B_local, B_global]
    logits_per_text = logit_scale * text_features @ all_image.T
    b = image_features.shape[0]
    labels = torch.arange(b, device=image_features.device) + rank * b
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): every image-text pair is a binary positive/negative.

    Features [B_local, D], L2-normalised; logit_scale (exp()'d) and logit_bias scalars.
    Normalised by the local batch size as in the paper, so the rank mean is the global loss.
    """
    rank, _ = world()
    all_text = gather_with_grad(text_features)
    logits = logit_scale * image_features @ all_text.T + logit_bias  # [B_local, B_global]
    b = image_features.shape[0]
    targets = -torch.ones_like(logits)
    idx = torch.arange(b, device=logits.device)
    targets[idx, idx + rank * b] = 1.0
    return -F.logsigmoid(targets * logits).sum() / b


def contrastive_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Fraction of local images whose best-scoring local caption is their own: a cheap training signal."""
    pred = (image_features @ text_features.T).argmax(dim=1)
    return (pred == torch.arange(len(pred), device=pred.device)).float().mean().item()
