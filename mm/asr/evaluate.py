"""Held-out evaluation of a speech recogniser: batched greedy decoding, WER/CER per language, language-ID
accuracy and the real-time factor. Every rank decodes its slice; rank 0's result covers all of them.

    scores = evaluate_asr(model, tokenizer, "data/asr_synth/heldout", device)
"""
from __future__ import annotations

import time

import torch

from mm.asr.data import asr_collate, asr_decoder
from mm.asr.decode import detect_language, greedy_decode
from mm.asr.metrics import asr_scores
from mm.distributed import all_gather_objects
from mm.shards import iterate_eval_batches


@torch.no_grad()
def transcribe_features(model, tokenizer, features: torch.Tensor, mask: torch.Tensor | None, languages: list[str],
                        max_new_tokens: int = 128) -> list[str]:
    """Greedy transcripts, without timestamps, of encoded audio [B, T, D] in the given languages."""
    prompts = torch.tensor([tokenizer.sot_sequence(lang, timestamps=False) for lang in languages],
                           device=features.device)
    suppress = list(range(tokenizer.eot + 1, tokenizer.vocab_size))  # every special token but <|endoftext|>
    ids = greedy_decode(model, features, mask, prompts, tokenizer.eot, max_new_tokens, suppress)
    return [tokenizer.decode(t).strip() for t in ids]


@torch.no_grad()
def transcribe_batch(model, tokenizer, mel: torch.Tensor, mel_lengths: torch.Tensor | None,
                     languages: list[str] | None = None, max_new_tokens: int = 128) -> tuple[list[str], list[str]]:
    """(texts, languages) for a batch of log-mels [B, n_mels, F]. Each language is detected from the
    audio unless given."""
    features, mask = model.embed_audio(mel, mel_lengths)
    if languages is None:
        best, _ = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
        languages = [tokenizer.languages[i] for i in best.tolist()]
    return transcribe_features(model, tokenizer, features, mask, languages, max_new_tokens), languages


@torch.no_grad()
def evaluate_asr(model, tokenizer, spec: str, device: torch.device, n_mels: int | None = None,
                 batch_size: int = 32, max_seconds: float = 30.0, pad_to_30s: bool = False,
                 language: str = "detect", max_new_tokens: int = 128, rank: int = 0, world_size: int = 1,
                 autocast=None) -> dict:
    """Scores over every sample of `spec` (see mm.asr.metrics.asr_scores) plus "rtf": decoding seconds
    per second of audio, "eval_utterances" and "eval_audio_s". language="detect" transcribes in the
    detected language (the end-to-end number); "given" uses the sample's own (LID is still measured)."""
    was_training = model.training
    model.eval()
    n_mels = n_mels or model.dims.n_mels
    decode = asr_decoder(tokenizer, n_mels=n_mels, train=False, max_seconds=max_seconds, pad_to_30s=pad_to_30s)
    refs, hyps, langs, preds, audio_s, busy_s = [], [], [], [], 0.0, 0.0
    for batch in iterate_eval_batches(spec, decode, asr_collate(tokenizer.eot), batch_size, rank, world_size):
        t0 = time.perf_counter()
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            mel, lengths = batch["mel"].to(device), batch["mel_lengths"].to(device)
            features, mask = model.embed_audio(mel, lengths)
            best, _ = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
            detected = [tokenizer.languages[i] for i in best.tolist()]
            # at most ~10 tokens per second of speech (Whisper's own cap is 224 per 30 s): a model that never
            # says <|endoftext|> must not spend the evaluation writing max_new_tokens of nonsense
            cap = min(max_new_tokens, int(10 * max(batch["durations"])) + 16)
            texts = transcribe_features(model, tokenizer, features, mask,
                                        detected if language == "detect" else batch["languages"], cap)
        busy_s += time.perf_counter() - t0
        refs += batch["texts"]
        hyps += texts
        langs += batch["languages"]
        preds += detected
        audio_s += sum(batch["durations"])
    parts = all_gather_objects((refs, hyps, langs, preds, audio_s, busy_s))
    if was_training:
        model.train()
    refs, hyps, langs, preds = ([x for p in parts for x in p[i]] for i in range(4))
    audio_s, busy_s = sum(p[4] for p in parts), max(p[5] for p in parts)
    scores = asr_scores(refs, hyps, langs, preds)
    scores.update({"rtf": busy_s / max(audio_s, 1e-9), "eval_utterances": len(refs), "eval_audio_s": audio_s})
    scores["examples"] = [{"language": lang, "reference": r, "hypothesis": h}
                          for r, h, lang in list(zip(refs, hyps, langs))[:: max(1, len(refs) // 10)]]
    return scores
