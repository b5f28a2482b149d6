"""The CLIP training step's forward and backward, over one micro-batch or several that make ONE
contrastive batch (open_clip's `--accum-freq`).

Why not plain gradient accumulation: the contrastive loss of a batch compares every image with every
caption in it, so summing the losses of 4 micro-batches of B is not the loss of one batch of 4B (each
image sees 4x fewer negatives). Instead, as open_clip does: compute every micro-batch's features once
without gradient, then for each micro-batch recompute its features with gradient and take the loss
over ALL features (its own live, the others cached). The gradients summed over the micro-batches are
then exactly those of one batch of 4B, at the activation memory of B, for a second forward pass.

One detail open_clip gets wrong: the logit scale (and SigLIP's bias) enters each of the N losses, so its
gradient would be summed N times; here it carries gradient in one pass only, the last (the one whose
backward DDP synchronises, which needs every parameter used). Exact for towers without batch statistics
(ViTs: tested). A BatchNorm tower (the ResNets) normalises each micro-batch with its own statistics, so
there it is close, not equal; its running statistics are updated once per micro-batch, as without
accumulation (the cached pass leaves them as it found them). Dropout would have to draw the same masks in
both passes to be exact (the default towers use none).
"""
from __future__ import annotations

import torch

from mm.distributed import no_sync
from mm.losses import clip_loss, siglip_loss
from mm.precision import Precision


def contrastive_loss(kind: str, image_features: torch.Tensor, text_features: torch.Tensor, out: dict) -> torch.Tensor:
    """`kind` clip (InfoNCE) or siglip over [B, D] features (in fp32), with the scale (and bias) from `out`."""
    if kind == "siglip":
        return siglip_loss(image_features, text_features, out["logit_scale"], out["logit_bias"])
    return clip_loss(image_features, text_features, out["logit_scale"])


def contrastive_backward(model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         kind: str, precision: Precision) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one optimizer step over `micro_batches` [(images [B,3,H,W], tokens [B,L])],
    as one contrastive batch. Gradients synchronise across ranks on the last micro-batch only.
    Returns (the loss, detached; the model output of the last micro-batch)."""
    if len(micro_batches) == 1:
        with precision.autocast():
            out = model(*micro_batches[0])
        loss = contrastive_loss(kind, out["image_features"].float(), out["text_features"].float(), out)
        precision.backward(loss)
        return loss.detach(), out
    buffers = [(b, b.clone()) for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    with torch.no_grad(), precision.autocast():
        cached = [model(images, texts) for images, texts in micro_batches]
        for b, saved in buffers:  # BatchNorm running stats: the passes with gradient update them, once each
            b.copy_(saved)
    images_f = [o["image_features"].float() for o in cached]
    texts_f = [o["text_features"].float() for o in cached]
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        with no_sync(model, skip=j < last):
            with precision.autocast():
                out = model(images, texts)
            img = torch.cat(images_f[:j] + [out["image_features"].float()] + images_f[j + 1:])
            txt = torch.cat(texts_f[:j] + [out["text_features"].float()] + texts_f[j + 1:])
            if j < last:  # the scale's (and bias') gradient is the whole batch's from one pass: the last
                out = {**out, **{k: out[k].detach() for k in ("logit_scale", "logit_bias") if k in out}}
            loss = contrastive_loss(kind, img, txt, out)
            precision.backward(loss)
    return loss.detach(), out
