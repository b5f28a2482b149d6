"""Collating decoded CLIP samples into batches. The decoders themselves are `mm.decoders`'
(`pair_decoder`, `labelled_decoder`), beside the audio and chat decoders.

Module-level functions (bound with functools.partial), so DataLoader workers can pickle them
under any start method.
"""
from __future__ import annotations

import functools
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image


def _collate_tokens(items, tokenizer):
    return torch.stack([i for i, _ in items]), tokenizer([c for _, c in items])


def token_collate(tokenizer):
    """[(image, caption)] -> (images [B, 3, H, W], tokens [B, L]): tokenized once per batch."""
    return functools.partial(_collate_tokens, tokenizer=tokenizer)


def collate_texts(items) -> tuple[torch.Tensor, list[str]]:
    """[(image, caption)] -> (images [B, 3, H, W], captions)."""
    return torch.stack([i for i, _ in items]), [c for _, c in items]


def collate_labels(items) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image, label)] -> (images [B, 3, H, W], labels [B])."""
    return torch.stack([i for i, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------- the train image transform, split in two

# Ours, not torchvision's: open_clip's train transform (RandomResizedCrop, ToTensor, Normalize) costs
# ~290 us a 32-px image on a CPU core, as much as the model's step there: RandomResizedCrop draws its
# crop with a dozen one-element torch ops (~65 us), and ToTensor + Normalize make floats one image at a
# time. The same crop, drawn with Python's `random` (seeded per sample by the loader, so a resume repeats
# it) and resized by PIL in one call, gives a uint8 tensor; the batch is normalised once, on the device,
# which also sends 4x fewer bytes to a GPU. Same distribution of crops, same resampling, same numbers.

class UInt8Crop:
    """PIL image -> uint8 [3, H, W]: RandomResizedCrop(size, scale, ratio) with torchvision's algorithm."""

    def __init__(self, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float], resample: int):
        self.size, self.scale, self.ratio, self.resample = size, scale, ratio, resample

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) as torchvision's RandomResizedCrop.get_params draws it."""
        area, log_ratio = width * height, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height  # torchvision's fallback: a central crop
        w, h = ((width, int(round(width / min(self.ratio)))) if in_ratio < min(self.ratio) else
                (int(round(height * max(self.ratio))), height) if in_ratio > max(self.ratio) else (width, height))
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # crop, then resize: resize(box=...) would also blend in pixels just outside the box
        img = img.convert("RGB").crop(self.crop_box(*img.size)).resize(self.size[::-1], self.resample)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W], (x / 255 - mean) / std, on the images' device."""
    mean, std = mean.to(images.device), std.to(images.device)
    return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images


def split_train_transform(preprocess) -> tuple[Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """(per-sample transform for the loader, per-batch finish for the training step) that together equal
    open_clip's `preprocess` train transform: UInt8Crop + normalize_uint8 when it is the standard
    RandomResizedCrop -> RGB -> ToTensor -> Normalize; otherwise (colour jitter, ...) itself + nothing."""
    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if names != ["RandomResizedCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"]:
        return preprocess, as_float
    crop, norm = steps[0], steps[-1]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(crop.interpolation.value)
    if resample is None:
        return preprocess, as_float
    fast = UInt8Crop(tuple(crop.size), tuple(crop.scale), tuple(crop.ratio), resample)
    return fast, functools.partial(normalize_uint8, mean=torch.tensor(norm.mean), std=torch.tensor(norm.std))
