"""Decoders: a raw sample (a WebDataset tar sample, or a JSONL manifest line) -> what a recipe trains on.

Each `*_decoder(...)` returns a module-level function bound with functools.partial, so DataLoader
workers can pickle it under any start method. A decoder raises (any exception) on a bad sample;
the loader counts it under `bad_samples` and goes on. Image decoding goes through `mm.media.open_image`,
so a decompression bomb inside a shard is refused from its header like an uploaded one.
"""
from __future__ import annotations

import functools
import json

import torch

from mm.media import DEFAULT_MAX_PIXELS, IMAGE_KEYS, open_image

TEXT_KEYS = ("txt", "caption", "text")


def first_key(sample: dict, keys: tuple[str, ...], what: str) -> bytes:
    """The value of the first of `keys` present in `sample`; a clear error naming the sample if none is."""
    for k in keys:
        if k in sample:
            return sample[k]
    raise KeyError(f"no {what} ({'/'.join(keys)}) in sample {sample.get('__key__')}; "
                   f"has {sorted(k for k in sample if not k.startswith('__'))}")


# ---------------------------------------------------------------- images (CLIP)

def decode_image(sample: dict, preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The sample's image (any of IMAGE_KEYS), RGB, through `preprocess` -> [3, H, W]."""
    return preprocess(open_image(first_key(sample, IMAGE_KEYS, "image"), max_pixels, name=f"sample {sample.get('__key__')}"))


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
