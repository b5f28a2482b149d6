"""ASR samples for the loader: decode -> augment -> log-mel -> target tokens, and the batch collate.

    decode = asr_decoder(tokenizer, n_mels=80, train=True, ...)   # a ShardStream decode stage
    batcher = BucketBatcher(mel_seconds, max_batch_seconds, bounds)  # duration buckets, no 30 s padding
    collate = asr_collate(tokenizer)

Randomness (speed, noise, SpecAugment, whether a target carries timestamps) comes from torch's CPU
generator and Python's `random`, which the loader seeds per sample from (seed, epoch, position): a
resumed run repeats every sample's augmentation exactly.
"""
from __future__ import annotations

import functools
import random

import torch

from mm.asr.features import (FRAMES_PER_SECOND, N_SAMPLES, add_noise, log_mel_spectrogram, pad_or_trim,
                             spec_augment, speed_perturb)
from mm.batching import SampleTooLong
from mm.decoders import audio_decoder


def asr_decoder(tokenizer, n_mels: int = 80, train: bool = True, max_seconds: float = 30.0,
                min_seconds: float = 0.0, pad_to_30s: bool = False, timestamp_prob: float = 0.5,
                speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1), noise_prob: float = 0.0,
                snr_db: tuple[float, float] = (10.0, 30.0), spec_augment_on: bool = True,
                default_language: str | None = None, max_target_tokens: int = 448, ctc: bool = False,
                max_frames: int = 3000):
    """decode(raw sample) -> {"mel": [n_mels, frames], "tokens": LongTensor [L], "loss_mask": BoolTensor [L],
    ("ctc_tokens": LongTensor [N]), "language", "text", "duration" (s, after speed perturbation)}.

    tokens are the whole decoder sequence ([sot, lang, transcribe, (notimestamps)] + body + [eot]); the
    loss mask says which positions are predicted (everything after sot). Training with timestamps needs
    the sample's "segments"; timestamp_prob of those that have them get timestamp tokens, the rest
    <|notimestamps|>. With train=False there is no augmentation and no timestamps. A sample whose
    language the tokenizer does not know raises (the loader counts it as bad). One whose log-mel is longer
    than max_frames (the encoder's 2 x n_audio_ctx; speed perturbation can stretch a clip past it) raises
    SampleTooLong (counted as too_long).
    """
    return functools.partial(_decode_asr, read=audio_decoder(max_seconds=max_seconds, min_seconds=min_seconds),
                             tokenizer=tokenizer, n_mels=n_mels, train=train, pad_to_30s=pad_to_30s,
                             timestamp_prob=timestamp_prob, speed_factors=tuple(speed_factors), noise_prob=noise_prob,
                             snr_db=tuple(snr_db), spec_augment_on=spec_augment_on,
                             default_language=default_language, max_target_tokens=max_target_tokens, ctc=ctc,
                             max_frames=max_frames)


def _decode_asr(sample: dict, read, tokenizer, n_mels: int, train: bool, pad_to_30s: bool, timestamp_prob: float,
                speed_factors: tuple, noise_prob: float, snr_db: tuple, spec_augment_on: bool,
                default_language: str | None, max_target_tokens: int, ctc: bool, max_frames: int) -> dict:
    d = read(sample)
    language = d["language"] or default_language
    if language is None:
        raise ValueError(f"{sample['__key__']}: no language (set default_language for unlabelled data)")
    if language not in tokenizer.languages:
        raise ValueError(f"{sample['__key__']}: language {language!r} has no token in this tokenizer")
    audio, segments = d["audio"], d.get("segments")
    if train:
        factor = random.choice(speed_factors) if speed_factors else 1.0
        if factor != 1.0:
            audio = speed_perturb(audio, factor)
            segments = segments and [{**s, "start": s["start"] / factor, "end": s["end"] / factor} for s in segments]
        if noise_prob and random.random() < noise_prob:
            audio = add_noise(audio, random.uniform(*snr_db), torch.default_generator)
    duration = len(audio) / 16000
    mel = log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES) if pad_to_30s else audio, n_mels)
    if mel.shape[-1] > max_frames:
        raise SampleTooLong(f"{sample['__key__']}: {mel.shape[-1]} log-mel frames (after speed perturbation) exceed "
                            f"the encoder's {max_frames}")
    if train and spec_augment_on:
        mel = spec_augment(mel, torch.default_generator)
    timestamps = bool(train and segments and random.random() < timestamp_prob)
    tokens, loss_mask = tokenizer.build_target(d["text"], language, segments=segments if timestamps else None,
                                               timestamps=timestamps, max_len=max_target_tokens)
    out = {"mel": mel, "tokens": torch.tensor(tokens), "loss_mask": torch.tensor(loss_mask),
           "language": language, "text": d["text"], "duration": duration}
    if ctc:
        out["ctc_tokens"] = torch.tensor(tokenizer.encode(" " + d["text"].strip()))
    return out


def mel_seconds(sample: dict) -> float:
    """A decoded sample's length in seconds of log-mel frames: what the duration buckets sort by."""
    return sample["mel"].shape[-1] / FRAMES_PER_SECOND


def asr_collate(pad_token: int):
    """collate(list of decoded samples) -> batch dict:
    mel [B, n_mels, F] (zero-padded: the encoder masks the padding), mel_lengths [B],
    tokens [B, L-1] decoder input, labels [B, L-1] next tokens (-100 where not predicted or padding),
    (ctc_targets [B, N] padded with 0, ctc_lengths [B]), languages, texts, durations."""
    return functools.partial(_collate, pad_token=pad_token)


def _collate(samples: list[dict], pad_token: int) -> dict:
    B = len(samples)
    n_mels, F = samples[0]["mel"].shape[0], max(s["mel"].shape[-1] for s in samples)
    L = max(len(s["tokens"]) for s in samples)
    mel = torch.zeros(B, n_mels, F)
    tokens = torch.full((B, L), pad_token, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        mel[i, :, :s["mel"].shape[-1]] = s["mel"]
        n = len(s["tokens"])
        tokens[i, :n] = s["tokens"]
        labels[i, :n] = torch.where(s["loss_mask"], s["tokens"], -100)
    batch = {"mel": mel, "mel_lengths": torch.tensor([s["mel"].shape[-1] for s in samples]),
             "tokens": tokens[:, :-1], "labels": labels[:, 1:],
             "languages": [s["language"] for s in samples], "texts": [s["text"] for s in samples],
             "durations": [s["duration"] for s in samples]}
    if "ctc_tokens" in samples[0]:
        lengths = torch.tensor([len(s["ctc_tokens"]) for s in samples])
        targets = torch.zeros(B, int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(samples):
            targets[i, :len(s["ctc_tokens"])] = s["ctc_tokens"]
        batch["ctc_targets"], batch["ctc_lengths"] = targets, lengths
    return batch


def read_transcripts(urls: list[str], limit: int = 200_000, languages: set | None = None) -> list[str]:
    """Up to `limit` transcripts from shards or manifests (json "text" or a txt field), to train a BPE on.
    Unreadable samples are skipped here; the training loader counts them. A `languages` set is filled with
    the json "language" codes of those samples."""
    import json

    from mm.decoders import TEXT_KEYS
    from mm.shards import read_samples
    texts, counts = [], {"bad_shards": 0}
    for sample in read_samples(urls, counts):
        try:
            key = next((k for k in TEXT_KEYS if k in sample), None)
            meta = json.loads(sample["json"]) if "json" in sample else {}
            text = sample[key].decode() if key else meta.get("text")
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        if languages is not None and isinstance(meta.get("language"), str):
            languages.add(meta["language"])
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
            if len(texts) >= limit:
                break
    return texts
