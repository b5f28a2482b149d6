"""Decoding WebDataset samples for CLIP: raw sample -> (image tensor, caption or label), and the collates.

Module-level functions (bound with functools.partial), so DataLoader workers can pickle them
under any start method.
"""
from __future__ import annotations

import functools
import io
import json

import torch
from PIL import Image

from mm.shards import IMAGE_KEYS, TEXT_KEYS, first_key


def decode_image(sample: dict, preprocess) -> torch.Tensor:
    """The sample's image (jpg/png/webp...), RGB, through `preprocess` -> [3, H, W]."""
    return preprocess(Image.open(io.BytesIO(first_key(sample, IMAGE_KEYS, "image"))).convert("RGB"))


def _decode_pair(sample: dict, preprocess) -> tuple[torch.Tensor, str]:
    caption = first_key(sample, TEXT_KEYS, "caption").decode("utf-8").strip()
    if not caption:
        raise ValueError("empty caption")
    return decode_image(sample, preprocess), caption


def _decode_labelled(sample: dict, preprocess) -> tuple[torch.Tensor, int]:
    return decode_image(sample, preprocess), json.loads(sample["json"])["label_index"]


def pair_decoder(preprocess):
    """decode(sample) -> (image [3, H, W], caption); an empty caption is a bad sample."""
    return functools.partial(_decode_pair, preprocess=preprocess)


def labelled_decoder(preprocess):
    """decode(sample) -> (image [3, H, W], label index from the sample's json)."""
    return functools.partial(_decode_labelled, preprocess=preprocess)


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
