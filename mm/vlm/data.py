"""Vision-chat samples for the loader: a chat line -> token ids, labels and image pixels, then packs.

A stage of mm.shards' chain: `vlm_decoder` runs in the loader workers (JSON parsing, image fetching
and decoding, the chat template and tokenisation all happen there, off the training loop), and a
batcher (TokenPacker for packed training, FixedBatcher for the padded mode) groups what it returns.

    decode = vlm_decoder(tokenizer, transform, image_tokens=16, max_tokens=512)
    sample = decode(raw)  # {"input_ids": [T], "labels": [T], "pixel_values": [n, 3, H, W] | None, "n_loss": int}
"""
from __future__ import annotations

import functools
import hashlib

import torch

from mm.decoders import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, ChatFormatError, chat_decoder, sample_name
from mm.media import DEFAULT_MAX_PIXELS


def vlm_decoder(tokenizer, image_transform, *, image_tokens: int, max_tokens: int,
                max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, preference: bool = False):
    """decode(raw sample) -> one tokenised SFT sample (or, with preference=True, a DPO pair).

    Raises (the loader counts and skips): ChatFormatError for a line that breaks the format or a
    preference line among SFT data (and the reverse); image errors; TemplateMismatch when the chat
    template and the tokens disagree; NoAnswerTokens (a SampleTooLong, counted as too_long) when
    truncation leaves no answer token.
    """
    chat = chat_decoder(image_transform, max_pixels=max_pixels, max_images=max_images, max_image_bytes=max_image_bytes)
    return functools.partial(_decode, chat=chat, tokenizer=tokenizer, image_tokens=image_tokens,
                             max_tokens=max_tokens, preference=preference, cache=_TokenCache())


# Tokens of a conversation kept per line (each loader process its own), so later epochs skip the chat template
# and the tokenizer (rendered 2n+1 times for n answers, ~0.4 ms a conversation): a built-in training step took 72 ms
# with it against 81-83 without (2-core EPYC). Keyed by a digest of the line's bytes (a line may hold data: URL
# images), so a changed line is tokenised anew; int32 ids and labels, at most this many tokens (~160 MB a process).
TOKEN_CACHE_TOKENS = 20_000_000


class _TokenCache:
    """line digest -> (ids, labels, images kept), until TOKEN_CACHE_TOKENS tokens are held."""

    def __init__(self):
        self.lines, self.tokens = {}, 0

    @staticmethod
    def key(raw) -> bytes | None:
        return hashlib.blake2b(raw, digest_size=16).digest() if isinstance(raw, bytes) else None

    def get(self, key):
        return self.lines.get(key)

    def put(self, key, ids: torch.Tensor, labels: torch.Tensor, n_images: int) -> None:
        if key is not None and self.tokens + len(ids) <= TOKEN_CACHE_TOKENS:
            self.lines[key] = (ids.int(), labels.int(), n_images)
            self.tokens += len(ids)


def _decode(sample: dict, chat, tokenizer, image_tokens: int, max_tokens: int, preference: bool,
            cache: _TokenCache) -> dict:
    from mm.vlm.chat import tokenize_chat, tokenize_preference
    decoded = chat(sample)
    name = sample_name(sample)
    if preference != ("prompt" in decoded):
        want, got = ("preference", "supervised") if preference else ("supervised", "preference")
        raise ChatFormatError(f"{name}: a {got} line in {want} data")
    if preference:
        chosen, rejected = tokenize_preference(tokenizer, decoded["prompt"], decoded["chosen"], decoded["rejected"],
                                               max_tokens=max_tokens, image_tokens=image_tokens, name=name)
        return {side: _tensors(torch.tensor(t.input_ids), torch.tensor(t.labels), t.n_images, decoded["images"])
                for side, t in (("chosen", chosen), ("rejected", rejected))}
    key = _TokenCache.key(sample.get("json"))
    if (hit := cache.get(key)) is not None:
        ids, labels, n_images = hit
        return _tensors(ids.long(), labels.long(), n_images, decoded["images"])
    tokens = tokenize_chat(tokenizer, decoded["messages"], max_tokens=max_tokens, image_tokens=image_tokens, name=name)
    ids, labels = torch.tensor(tokens.input_ids), torch.tensor(tokens.labels)
    cache.put(key, ids, labels, tokens.n_images)
    return _tensors(ids, labels, tokens.n_images, decoded["images"])


def _tensors(ids: torch.Tensor, labels: torch.Tensor, n_images: int, images: list) -> dict:
    """Ids and labels as int64 tensors, the images kept after truncation stacked [n, 3, H, W]."""
    kept = images[:n_images]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.stack(kept) if kept else None,
            "n_loss": int((labels != -100).sum())}


def sample_tokens(sample: dict) -> int:
    """The batcher's length: tokens of a decoded sample (both sides of a preference pair)."""
    if "chosen" in sample:
        return len(sample["chosen"]["input_ids"]) + len(sample["rejected"]["input_ids"])
    return len(sample["input_ids"])


def packed_collate(samples: list[dict]) -> dict:
    """One pack -> {"input_ids": [1, T], "labels": [1, T], "position_ids": [1, T], "pixel_values": [n, 3, H, W]
    | None, "n_samples", "n_loss"}: mm.vlm.model.pack_batch, plus the images in order."""
    from mm.vlm.model import pack_batch
    batch = pack_batch(samples)
    return batch | _images(samples)


def padded_collate(pad_id: int):
    """Samples -> a right-padded batch with an attention mask (the padded mode, for comparison)."""
    return functools.partial(_padded, pad_id=pad_id)


def _padded(samples: list[dict], pad_id: int) -> dict:
    from mm.vlm.model import pad_batch
    return pad_batch(samples, pad_id) | _images(samples)


def _images(samples: list[dict]) -> dict:
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"pixel_values": torch.cat(pixels) if pixels else None, "n_samples": len(samples),
            "n_loss": sum(s["n_loss"] for s in samples)}
