"""Collating decoded CLIP samples into batches. The decoders themselves are `mm.decoders`'
(`pair_decoder`, `labelled_decoder`), beside the audio and chat decoders.

Module-level functions (bound with functools.partial), so DataLoader workers can pickle them
under any start method.
"""
from __future__ import annotations

import functools

import torch


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
