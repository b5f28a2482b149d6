"""Filters: rules with thresholds, each dropping a sample under its reason code. Every rule is off until set.

    python -m data_tools.curate.filters raw/ --output=filtered/ --min_side=200 --max_aspect=3 --languages=en

Reason codes (the first failing rule is recorded, text rules first, then image, then audio):

  caption_words     fewer than min_words or more than max_words words (split on whitespace)
  caption_chars     fewer than min_chars or more than max_chars characters (stripped)
  language          the caption's most likely language (lingua, offline) is not one of `languages`, or its
                    confidence is below `min_confidence`; lingua chooses among `candidate_languages` + `languages`
  blocklist         a caption holding one of the `blocklist` words (whole words, any case)
  blocklist_regex   a caption matching one of the `blocklist_regex` patterns (any case)
  no_text           a text rule is set and the sample has no caption or transcript
  min_side          an image whose shorter side is below min_side pixels (DataComp's basic filter: 200)
  max_aspect        an image whose longer / shorter side exceeds max_aspect (DataComp: 3)
  duration          audio shorter than min_seconds or longer than max_seconds (from the file's header)
  silence           audio with more than max_silence_ratio of its 20 ms frames below silence_db dBFS (RMS, at
                    16 kHz; -40 dBFS is 1% of full scale: room noise in a quiet recording, well under speech)
  chars_per_second  a transcript read at fewer than min_ or more than max_chars_per_second characters (spaces
                    excluded) per second of audio: misaligned or mis-cut. Read speech runs at ~12-16.
  corrupt           an image, audio or text that cannot be decoded (only checked when a rule needs it)

Image rules apply to samples with an image, audio rules to samples with audio, so one config can filter
image-text and speech shards alike.
"""
from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from mm.config import ConfigError

from data_tools.curate.io import decode_image, sample_audio_bytes, sample_image_bytes, sample_text
from data_tools.curate.report import Report

FRAME_SECONDS = 0.02  # silence is measured over 20 ms frames
AUDIO_RATE = 16000  # Hz, the rate audio is decoded at for the silence rule
# A small set: lingua loads every candidate's models on first use (these 10: ~4 s and ~330 MB;
# 20 took 7 s and ~430 MB). low_accuracy=true loads in 0.3 s and little memory.
DEFAULT_CANDIDATES = ["en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja"]

Verdict = tuple[str, str] | None  # (reason code, detail) to drop, None to keep


@dataclass
class FiltersConfig:
    min_words: int | None = None  # drop captions with fewer words (reason caption_words)
    max_words: int | None = None  # drop captions with more words (reason caption_words)
    min_chars: int | None = None  # drop captions with fewer characters (reason caption_chars)
    max_chars: int | None = None  # drop captions with more characters (reason caption_chars)
    languages: list[str] = field(default_factory=list)  # ISO 639-1 codes a caption may be in, e.g. en,de (empty: any)
    min_confidence: float = 0.0  # drop captions whose detected language has a lower confidence (0..1)
    candidate_languages: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))  # what lingua picks from
    low_accuracy: bool = False  # lingua's trigram-only mode: 10x faster, far smaller, wrong more on short captions
    blocklist: list[str] = field(default_factory=list)  # words that drop a caption (whole words, any case)
    blocklist_regex: list[str] = field(default_factory=list)  # Python regexes that drop a caption (any case)
    min_side: int | None = None  # drop images whose shorter side has fewer pixels (DataComp: 200)
    max_aspect: float | None = None  # drop images whose longer / shorter side is larger (DataComp: 3)
    min_seconds: float | None = None  # drop audio shorter than this (reason duration)
    max_seconds: float | None = None  # drop audio longer than this (reason duration)
    max_silence_ratio: float | None = None  # drop audio with a larger fraction of silent 20 ms frames (0..1)
    silence_db: float = -40.0  # a 20 ms frame whose RMS is below this many dB full scale is silent
    min_chars_per_second: float | None = None  # drop transcripts with fewer characters per second of audio
    max_chars_per_second: float | None = None  # drop transcripts with more characters per second of audio


# ---------------------------------------------------------------- text rules

def iso_language(code: str):
    """An ISO 639-1 code ("en") -> lingua's Language; ConfigError naming the codes lingua knows."""
    from lingua import IsoCode639_1, Language

    iso = getattr(IsoCode639_1, code.strip().upper(), None)
    if iso is None or len(code.strip()) != 2:
        known = sorted(lang.iso_code_639_1.name.lower() for lang in Language.all())
        raise ConfigError(f"unknown language code {code!r}: ISO 639-1 codes lingua knows are {', '.join(known)}")
    return Language.from_iso_code_639_1(iso)


def build_language_detector(languages: list[str], candidates: list[str], low_accuracy: bool = False):
    """One lingua detector over the allowed and candidate languages (models load on first use, offline)."""
    from lingua import LanguageDetectorBuilder

    chosen = {iso_language(c) for c in [*languages, *candidates]}
    if len(chosen) < 2:
        raise ConfigError("language detection needs at least two languages to choose from: add candidate_languages")
    builder = LanguageDetectorBuilder.from_languages(*chosen)
    return (builder.with_low_accuracy_mode() if low_accuracy else builder).build()


def check_language(text: str, detector, allowed: set[str], min_confidence: float) -> Verdict:
    values = detector.compute_language_confidence_values(text)
    if not values or values[0].value <= 0:
        return "language", "no language detected"
    best = values[0]
    code = best.language.iso_code_639_1.name.lower()
    if code not in allowed:
        return "language", f"{code} ({best.value:.2f}), not one of {','.join(sorted(allowed))}: {text[:80]!r}"
    if best.value < min_confidence:
        return "language", f"{code} at confidence {best.value:.2f} < {min_confidence}"
    return None


def check_range(value: float, low: float | None, high: float | None, reason: str, unit: str) -> Verdict:
    if low is not None and value < low:
        return reason, f"{value:g} {unit} < {low:g}"
    if high is not None and value > high:
        return reason, f"{value:g} {unit} > {high:g}"
    return None


def compile_blocklist(words: list[str], patterns: list[str]) -> tuple[re.Pattern | None, list[re.Pattern]]:
    """One whole-word pattern for the words, and each regex compiled; ConfigError for a bad regex."""
    words = [w.strip() for w in words if w.strip()]
    word_re = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else None
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise ConfigError(f"--blocklist_regex: {p!r} is not a regular expression ({e})") from None
    return word_re, compiled


# ---------------------------------------------------------------- image and audio rules

def check_image(sample: dict, cfg: FiltersConfig) -> Verdict:
    """min_side and max_aspect; raises (corrupt) when the image does not decode."""
    w, h = decode_image(sample).size
    if cfg.min_side is not None and min(w, h) < cfg.min_side:
        return "min_side", f"{w}x{h}: shorter side {min(w, h)} < {cfg.min_side}"
    if cfg.max_aspect is not None and max(w, h) / min(w, h) > cfg.max_aspect:
        return "max_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect:g}"
    return None


def audio_seconds(data: bytes) -> float:
    """Duration from the audio file's header; raises (corrupt) when soundfile cannot open it."""
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as f:
        if f.frames <= 0 or f.samplerate <= 0:
            raise ValueError("the audio header declares no samples")
        return f.frames / f.samplerate


def silence_ratio(data: bytes, silence_db: float) -> float:
    """The fraction of 20 ms frames (at 16 kHz) whose RMS is below `silence_db` dB full scale."""
    from mm.media import load_audio

    wave = load_audio(data, sample_rate=AUDIO_RATE)  # mono float32; refuses over 10 minutes (memory stays bounded)
    hop = int(FRAME_SECONDS * AUDIO_RATE)
    n = max(1, len(wave) // hop)
    frames = wave[: n * hop].reshape(n, hop) if len(wave) >= hop else wave[None, :]  # a last partial frame is left out
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    db = 20 * np.log10(np.maximum(rms, 1e-10))
    return float(np.mean(db < silence_db))


def check_audio(sample: dict, text: str | None, cfg: FiltersConfig) -> Verdict:
    """duration, silence and chars_per_second; raises (corrupt) when the audio does not open or decode."""
    _, data = sample_audio_bytes(sample)
    seconds = audio_seconds(data)
    verdict = check_range(round(seconds, 3), cfg.min_seconds, cfg.max_seconds, "duration", "s")
    if verdict is None and cfg.max_silence_ratio is not None:
        ratio = silence_ratio(data, cfg.silence_db)
        if ratio > cfg.max_silence_ratio:
            verdict = ("silence", f"{ratio:.2f} of 20 ms frames below {cfg.silence_db:g} dBFS > "
                                  f"{cfg.max_silence_ratio:g}")
    if verdict is None and (cfg.min_chars_per_second is not None or cfg.max_chars_per_second is not None):
        if text is None:
            return "no_text", "no transcript to check chars_per_second against"
        rate = len("".join(text.split())) / seconds
        verdict = check_range(round(rate, 2), cfg.min_chars_per_second, cfg.max_chars_per_second,
                              "chars_per_second", "chars/s")
    return verdict


# ---------------------------------------------------------------- the step

def uses_text(cfg: FiltersConfig) -> bool:
    return any(v not in (None, []) for v in (cfg.min_words, cfg.max_words, cfg.min_chars, cfg.max_chars,
                                              cfg.languages, cfg.blocklist, cfg.blocklist_regex))


def uses_audio(cfg: FiltersConfig) -> bool:
    return any(v is not None for v in (cfg.min_seconds, cfg.max_seconds, cfg.max_silence_ratio,
                                       cfg.min_chars_per_second, cfg.max_chars_per_second))


def check_config(cfg: FiltersConfig) -> None:
    """ConfigError for values no rule can use: called by apply, and by the pipeline when it loads its YAML."""
    if not 0 <= cfg.min_confidence <= 1:
        raise ConfigError(f"--min_confidence={cfg.min_confidence}: must be 0..1")
    if cfg.max_aspect is not None and cfg.max_aspect < 1:
        raise ConfigError(f"--max_aspect={cfg.max_aspect}: an aspect ratio (longer / shorter side) is at least 1")
    if cfg.max_silence_ratio is not None and not 0 <= cfg.max_silence_ratio <= 1:
        raise ConfigError(f"--max_silence_ratio={cfg.max_silence_ratio}: a fraction of frames, 0..1")
    for code in [*cfg.languages, *(cfg.candidate_languages if cfg.languages else [])]:
        iso_language(code)
    compile_blocklist(cfg.blocklist, cfg.blocklist_regex)


def build_rules(cfg: FiltersConfig) -> Callable[[dict], Verdict]:
    """Check the config, build what the rules need (the language detector, the regexes) once, and return the
    function that judges one sample (raising when a field it needs is corrupt)."""
    check_config(cfg)
    detector = None
    if cfg.languages:
        detector = build_language_detector(cfg.languages, cfg.candidate_languages, cfg.low_accuracy)
    allowed = {c.strip().lower() for c in cfg.languages}
    word_re, regexes = compile_blocklist(cfg.blocklist, cfg.blocklist_regex)
    text_rules, audio_rules = uses_text(cfg), uses_audio(cfg)
    image_rules = cfg.min_side is not None or cfg.max_aspect is not None

    def judge(sample: dict) -> Verdict:
        text = sample_text(sample) if text_rules or audio_rules else None
        if text_rules:
            verdict = judge_text(text)
            if verdict is not None:
                return verdict
        if image_rules and sample_image_bytes(sample) is not None:
            verdict = check_image(sample, cfg)
            if verdict is not None:
                return verdict
        if audio_rules and sample_audio_bytes(sample) is not None:
            return check_audio(sample, text, cfg)
        return None

    def judge_text(text: str | None) -> Verdict:
        if text is None or not text.strip():
            return "no_text", "no caption or transcript" if text is None else "empty caption"
        verdict = (check_range(len(text.split()), cfg.min_words, cfg.max_words, "caption_words", "words")
                   or check_range(len(text.strip()), cfg.min_chars, cfg.max_chars, "caption_chars", "chars"))
        if verdict is None and word_re is not None and (m := word_re.search(text)):
            verdict = "blocklist", f"holds {m.group(0)!r}"
        for pattern in regexes if verdict is None else []:
            if pattern.search(text):
                verdict = "blocklist_regex", f"matches {pattern.pattern!r}"
                break
        if verdict is None and detector is not None:
            verdict = check_language(text, detector, allowed, cfg.min_confidence)
        return verdict

    return judge


def apply(samples: Iterable[dict], cfg: FiltersConfig, report: Report) -> Iterator[dict]:
    """Yield the samples every set rule passes; record the others under the first failing rule's reason."""
    judge = build_rules(cfg)
    for sample in samples:
        report.seen()
        try:
            verdict = judge(sample)
        except Exception as e:  # noqa: BLE001 - a corrupt image, audio or text is counted, never fatal
            report.corrupt(str(sample.get("__key__")), e)
            continue
        if verdict is not None:
            report.drop(sample, *verdict)
            continue
        report.keep(sample)
        yield sample


def main(argv: list[str] | None = None) -> None:
    from data_tools.curate.cli import run_tool

    sys.exit(run_tool("filters", apply, FiltersConfig, argv, check=check_config))


if __name__ == "__main__":
    main()
