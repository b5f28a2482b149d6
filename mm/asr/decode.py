"""Batched decoding with the KV cache: language detection and greedy search (whisper.decoding's, in brief).

Both take audio features already encoded (`model.embed_audio(mel, mel_lengths)`), so one encoder pass can serve
language detection and transcription. Token ids (sot, eot, language and timestamp tokens) are the tokenizer's
business: they come in as arguments.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mm.asr.model import KVCache, Whisper


@torch.no_grad()
def detect_language(model: Whisper, audio_features: Tensor, audio_mask: Tensor | None, sot: int,
                    language_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One decoder step on [sot] per sample; audio_features [B, T', D], audio_mask [B, T'] or None.
    Returns (best [B] long: an index into `language_token_ids`, probs [B, n_lang]: softmax over the language
    tokens only, as whisper.decoding.detect_language)."""
    tokens = torch.full((audio_features.shape[0], 1), sot, dtype=torch.long, device=audio_features.device)
    logits = model.logits(tokens, audio_features, audio_mask)[:, 0]
    ids = torch.as_tensor(list(language_token_ids), dtype=torch.long, device=logits.device)
    probs = logits[:, ids].softmax(dim=-1)
    return probs.argmax(dim=-1), probs


@torch.no_grad()
def greedy_decode(model: Whisper, audio_features: Tensor, audio_mask: Tensor | None, prompts: Tensor, eot: int,
                  max_new_tokens: int, suppress: Sequence[int] = ()) -> list[list[int]]:
    """Greedy decoding of a batch. audio_features [B, T', D], audio_mask [B, T'] or None, prompts [B, P] long
    (each row e.g. [sot, language, transcribe, notimestamps]). Each step takes the argmax after setting the
    `suppress` ids to -inf (e.g. the special tokens other than eot, and timestamp tokens when off). A row stops
    at eot or after `max_new_tokens` (fewer if the decoder's n_text_ctx positions run out); finished rows leave
    the batch and the cache, so the rest decode faster. Returns, per row, the generated ids without the prompt
    and without eot."""
    batch, n_prompt = prompts.shape
    # generating N tokens feeds N - 1 of them back: the last one fed sits at position n_prompt + N - 2
    max_new_tokens = min(max_new_tokens, model.dims.n_text_ctx - n_prompt + 1)
    suppress_ids = torch.as_tensor(list(suppress), dtype=torch.long, device=prompts.device)
    results: list[list[int]] = [[] for _ in range(batch)]
    rows = list(range(batch))  # which original row each current batch row is
    cache, tokens = KVCache(), prompts
    for _ in range(max_new_tokens):
        logits = model.logits(tokens, audio_features, audio_mask, cache)[:, -1]
        if len(suppress_ids):
            logits[:, suppress_ids] = float("-inf")
        next_tokens = logits.argmax(dim=-1)
        finished = next_tokens == eot
        for row, token, done in zip(rows, next_tokens.tolist(), finished.tolist()):
            if not done:
                results[row].append(token)
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            rows = [rows[i] for i in keep.tolist()]
            next_tokens, audio_features = next_tokens[keep], audio_features[keep]
            audio_mask = audio_mask[keep] if audio_mask is not None else None
            cache.select_rows(keep)
        tokens = next_tokens[:, None]
    return results
