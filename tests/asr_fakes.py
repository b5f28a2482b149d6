"""A stand-in for mm.asr.transcriber.Transcriber, for testing the ASR entry points (CLI, HTTP API, demo) fast and
without a model: the same contract (Segment and Transcript are the real ones, options are TranscribeOptions'
fields), fixed transcripts, the same errors. Each entry point is also tested with the real Transcriber on the
session's trained tiny model (tests/asr_fixtures.py).

    install_fake_transcriber(monkeypatch)   # Transcriber.from_checkpoint(...) now gives a FakeTranscriber
"""
from __future__ import annotations

import dataclasses
import io
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import soundfile

from mm.asr.transcribe import Segment, Transcript, TranscribeOptions
from mm.media import SAMPLE_RATE, load_audio

OPTION_NAMES = {f.name for f in dataclasses.fields(TranscribeOptions)}  # the keywords Transcriber accepts


def segment(i: int, start: float, end: float, text: str) -> Segment:
    return Segment(id=i, seek=0, start=start, end=end, text=text, tokens=[50364 + i, 400, 401],
                   temperature=0.0, avg_logprob=-0.25, compression_ratio=1.1, no_speech_prob=0.01)


def transcript(segments: list[tuple[float, float, str]], language: str = "en", duration: float | None = None):
    segs = [segment(i, *s) for i, s in enumerate(segments)]
    return Transcript(text="".join(s.text for s in segs), language=language, language_prob=0.9, segments=segs,
                      duration=duration if duration is not None else max((s.end for s in segs), default=0.0))


# What the fake hears: the detected language is "en" unless the audio's peak says otherwise
# (0.25 -> "ru", 0.75 -> "el"), so tests can make files "in" other languages.
PEAK_LANGUAGES = {0.25: "ru", 0.75: "el"}
SAID = {"en": " hello world", "ru": " привет мир", "el": " γεια σου κόσμε"}


class FakeTranscriber:
    """mm.asr.transcriber.Transcriber's contract with no model: two segments splitting the audio in half,
    " hello" and " world" (or the language's words), "[translated]" under task="translate"."""

    def __init__(self, languages=("en", "ru", "el"), can_translate: bool = True, max_seconds: float = 30.0,
                 delay: float = 0.0, name: str = "fake"):
        self.name, self.device, self.languages = name, "cpu", list(languages)
        self.can_translate, self.max_seconds, self.delay = can_translate, max_seconds, delay
        self.calls: list[dict] = []  # each call's arguments, for the tests to read
        self.active = self.most_active = 0  # calls running at once (now / at most)
        self._count = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path, device=None, max_seconds: float = 3600.0) -> "FakeTranscriber":
        return cls(max_seconds=max_seconds, name=f"fake:{Path(path).name}")

    def transcribe(self, audio, language=None, task="transcribe", timestamps=True, **options):
        return self.transcribe_batch([audio], language, task, timestamps, batch_size=1, **options)[0]

    def transcribe_batch(self, audios, language=None, task="transcribe", timestamps=True, batch_size=16, **options):
        if language is not None and language not in self.languages:
            raise ValueError(f"language {language!r} is not one of this model's: {', '.join(self.languages)}")
        if task not in ("transcribe", "translate") or (task == "translate" and not self.can_translate):
            raise ValueError(f"this model cannot {task}")
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise ValueError(f"unknown options {unknown}")
        if not audios:  # as the real one: every check made, nothing decoded (the CLI checks its options so)
            return []
        waves = [a if isinstance(a, np.ndarray) else load_audio(a, SAMPLE_RATE, self.max_seconds) for a in audios]
        self.calls.append({"n": len(waves), "language": language, "task": task, "timestamps": timestamps,
                           "batch_size": batch_size, **options})
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.delay)
            return [self._hear(w, language, task, timestamps) for w in waves]
        finally:
            with self._count:
                self.active -= 1

    def _hear(self, wave: np.ndarray, language, task, timestamps):
        duration = len(wave) / SAMPLE_RATE
        peak = round(float(np.abs(wave).max()), 2) if len(wave) else 0.0
        lang = language or PEAK_LANGUAGES.get(peak, "en")
        words = SAID[lang] if task == "transcribe" else " [translated] hello world"
        first, second = words.rsplit(" ", 1)
        if not timestamps:
            return transcript([(0.0, duration, words)], lang, duration)
        return transcript([(0.0, duration / 2, first), (duration / 2, duration, " " + second)], lang, duration)


def install_fake_transcriber(monkeypatch, cls=None, **kwargs) -> list:
    """Make `from mm.asr.transcriber import Transcriber` give `cls` (FakeTranscriber), built with `kwargs` by
    from_checkpoint, for this test. Returns the list that collects the transcribers made."""
    made = []
    base = cls or FakeTranscriber

    class Installed(base):
        @classmethod
        def from_checkpoint(cls, path, device=None, max_seconds: float = 3600.0):
            fake = cls(**{"max_seconds": max_seconds, **kwargs})
            fake.name, fake.device = f"fake:{Path(path).name}", device or "cpu"
            made.append(fake)
            return fake

    module = types.ModuleType("mm.asr.transcriber")
    module.Transcriber = Installed
    monkeypatch.setitem(sys.modules, "mm.asr.transcriber", module)
    return made


def wav_bytes(seconds: float = 1.0, rate: int = SAMPLE_RATE, peak: float = 0.5, fmt: str = "WAV") -> bytes:
    """A sine of `peak` amplitude (which the fake hears as a language, see PEAK_LANGUAGES) as audio bytes."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (peak * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt,
                    subtype="PCM_16" if fmt == "WAV" else None)
    return buf.getvalue()


def write_audio(path: Path, seconds: float = 1.0, peak: float = 0.5) -> Path:
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(seconds, peak=peak, fmt=fmt))
    return path
