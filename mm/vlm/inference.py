"""Talking to a trained vision-chat model: `VisionChat.from_checkpoint(path).chat(messages)`.

    chat = VisionChat.from_checkpoint("runs/vlm")
    reply = chat.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "scene.png"}},
        {"type": "text", "text": "What colour is the star?"}]}], max_new_tokens=32, image_root=".")
    print(reply.text)
    for piece in chat.stream(messages): print(piece, end="")

Messages are in OpenAI's chat format (content a string or text / image_url parts; an image url is a
data: URL, a file:// URL, an absolute path, or a path relative to `image_root`, default the working
directory). They are checked with
the same rules as training data, and every image is checked against max_pixels before it is decoded,
so bad input fails before generation.
Generation is the language model's own `generate` (KV cache, sampling, stopping) on the prompt's
embeddings with the image features in place; batches are left-padded.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mm.decoders import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, ChatFormatError, _message
from mm.media import DEFAULT_MAX_PIXELS, open_image, read_ref, short_ref

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # stop tokens of common templates


class PromptTooLong(ValueError):
    """The prompt (text + image tokens) leaves no room to answer in the model's context."""


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


def find_export(path: str | Path) -> Path:
    """A run folder's export (runs/vlm -> runs/vlm/export), or the export folder itself."""
    from mm.vlm.model import VLM_CONFIG as CONFIG_FILE
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no trained vision-chat model here (no {CONFIG_FILE} in it or in its export/). "
                            "Train one with: python recipes/vlm/train.py")


def normalise_messages(messages, max_images: int) -> tuple[list[dict], list[str]]:
    """OpenAI-format request messages -> (canonical messages as mm.decoders returns them, image urls).
    The conversation must end with a user message: that is what the model answers."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    urls: list[str] = []
    out = [_message(m, f"messages[{i}]", urls, sft=True) for i, m in enumerate(messages)]
    if out[-1]["role"] != "user":
        raise ChatFormatError(f"the last message must be from the user, not {out[-1]['role']}: it is what gets answered")
    if len(urls) > max_images:
        raise ChatFormatError(f"{len(urls)} images, over the limit of {max_images}")
    return out, urls


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's eos plus the end-of-turn tokens its template uses."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return sorted(ids)


class VisionChat:
    """A trained vision-language model with its tokenizer and image transform, ready to answer."""

    def __init__(self, model, tokenizer, config: dict, device: str | torch.device = "cpu",
                 max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, name: str = "mm-vlm"):
        from mm.vlm.vision import image_transform
        self.model, self.tokenizer, self.config = model.to(device).eval(), tokenizer, config
        self.device = torch.device(device)
        self.max_images, self.max_pixels, self.max_image_bytes, self.name = max_images, max_pixels, max_image_bytes, name
        self.transform = image_transform(model.vision, train=False)
        self.image_tokens = model.tokens_per_image
        extra = config.get("extra") or {}  # what the recipe saved with the model (save_vlm's extra_config)
        self.context = int(extra.get("max_context") or getattr(model.lm.config, "max_position_embeddings", 2048))
        self.max_prompt_tokens = max(1, self.context - int(extra.get("answer_room", 64)))
        self.stop_ids = stop_token_ids(tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> "VisionChat":
        from mm.vlm.model import load_vlm
        export = find_export(path)
        model, tokenizer, config = load_vlm(export, device=device)
        return cls(model, tokenizer, config, device=device, name=kwargs.pop("name", Path(path).name or "mm-vlm"), **kwargs)

    # ------------------------------------------------------------------ input

    def prepare(self, messages, image_root: str | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Check and tokenise one conversation: (prompt ids, pixels [n, 3, H, W] or None). Relative image
        paths are read from `image_root`; without one they are refused (mm.media.read_ref)."""
        from mm.vlm.chat import prompt_ids
        canonical, urls = normalise_messages(messages, self.max_images)
        images = []
        for i, url in enumerate(urls):
            data = read_ref(url, image_root or os.getcwd(), self.max_image_bytes)
            images.append(self.transform(open_image(data, self.max_pixels, name=f"image {i} ({short_ref(url)})")))
        ids = prompt_ids(self.tokenizer, canonical, self.image_tokens)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens ({len(images)} image(s) x {self.image_tokens}), "
                                f"over the limit of {self.max_prompt_tokens} for a {self.context}-token context")
        return ids, (torch.stack(images) if images else None)

    def _batch(self, prepared: list[tuple[list[int], torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                      torch.Tensor]:
        """Left-padded prompt ids [B, T], their images [n, 3, H, W] | None, and the attention mask [B, T], for
        the model's generate (which puts the images in, and keeps them static where the model does)."""
        width = max(len(ids) for ids, _ in prepared)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in prepared], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in prepared], device=self.device)
        pixels = [p for _, p in prepared if p is not None]
        pixels = torch.cat(pixels).to(self.device) if pixels else None
        return ids, pixels, mask

    def _generate_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        sample = temperature > 0
        return {"max_new_tokens": max_new_tokens, "do_sample": sample, "temperature": temperature if sample else None,
                "top_p": top_p if sample else None, "top_k": None, "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True}

    # ------------------------------------------------------------------ output

    @torch.inference_mode()
    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float = 1.0, image_root: str | None = None) -> list[ChatReply]:
        """Answer several conversations in one left-padded batch (the KV cache of `generate`)."""
        kwargs = self._generate_kwargs(max_new_tokens, temperature, top_p)
        prepared = [self.prepare(m, image_root) for m in conversations]
        ids, pixels, mask = self._batch(prepared)
        out = self.model.generate(ids, pixels, attention_mask=mask, **kwargs)
        return [self._reply(row.tolist(), len(ids), max_new_tokens) for row, (ids, _) in zip(out, prepared)]

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, image_root: str | None = None) -> ChatReply:
        return self.chat_batch([messages], max_new_tokens, temperature, top_p, image_root)[0]

    def _reply(self, new_ids: list[int], prompt_tokens: int, max_new_tokens: int) -> ChatReply:
        """generate() with inputs_embeds returns only the new tokens; cut at the first stop token."""
        stop = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), None)
        kept = new_ids if stop is None else new_ids[:stop]
        finish = "stop" if stop is not None or len(new_ids) < max_new_tokens else "length"
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return ChatReply(text, prompt_tokens, len(kept) + (stop is not None), finish)

    def stream(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, image_root: str | None = None) -> Iterator[str]:
        """Text pieces as they are generated. Bad input raises here, at the call, not at the first next()."""
        kwargs = self._generate_kwargs(max_new_tokens, temperature, top_p)
        prepared = [self.prepare(messages, image_root)]
        return self._stream(prepared, kwargs)

    def _stream(self, prepared: list, kwargs: dict) -> Iterator[str]:
        from transformers import TextIteratorStreamer
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    ids, pixels, mask = self._batch(prepared)
                    self.model.generate(ids, pixels, attention_mask=mask, streamer=streamer, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            if piece:
                yield piece
        thread.join()
        if errors:
            raise errors[0]
