"""Synthetic multilingual speech shards: the built-in data that makes the ASR recipe run out of the box.

espeak-ng speaks sentences in 10 languages and three scripts (Latin, Cyrillic, Greek). Sentences are
random sequences of real words: each language draws a fixed vocabulary from its Debian word list
(`w*` packages, or hunspell's dictionary where Debian has no `w*` list), and `num2words` spells
numbers where it knows the language. Voices vary by espeak variant (male, female, klatt, ...), speed and
pitch. About a third of the utterances are several phrases with pauses between them; their json
carries each phrase's start and end time, so the model can learn timestamp tokens.

    <out>/train/shard-*.tar     key.flac (16 kHz mono) + key.json {"text", "language", "duration", ["segments"]}
    <out>/heldout/shard-*.tar   the same, spoken by voice variants never used in training, with
                                sentences that never occur in training
    <out>/info.json             what was written (its presence means the data is complete)

    python -m data_tools.synthetic_asr --out=data/asr_synth --per_language=600

Texts, voices, speeds, pitches and pauses depend only on the arguments; the audio itself may differ in
a few samples between builds (espeak-ng's voice source keeps state from one utterance to the next).

Speech comes from libespeak-ng through ctypes, not the `espeak-ng` command: one process per utterance
costs ~11 ms to start, the library call ~1.7 ms, and there is no maintained Python binding on PyPI.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import io
import json
import multiprocessing
import random
import threading
import unicodedata
from pathlib import Path

import numpy as np
import soundfile
import soxr
import webdataset as wds
from tqdm import tqdm

SAMPLE_RATE = 16000
INFO_VERSION = 2  # bump when what a given set of arguments writes changes


# language -> (espeak voice, word list file, its encoding, num2words language or None)
LANGUAGES = {
    "en": ("en-us", "/usr/share/dict/american-english", "utf-8", "en"),
    "de": ("de", "/usr/share/dict/ngerman", "utf-8", "de"),
    "fr": ("fr", "/usr/share/dict/french", "utf-8", "fr"),
    "es": ("es", "/usr/share/dict/spanish", "utf-8", "es"),
    "it": ("it", "/usr/share/dict/italian", "utf-8", "it"),
    "pl": ("pl", "/usr/share/dict/polish", "utf-8", "pl"),
    "sv": ("sv", "/usr/share/dict/swedish", "utf-8", "sv"),
    "ru": ("ru", "/usr/share/hunspell/ru_RU.dic", "utf-8", "ru"),
    "uk": ("uk", "/usr/share/dict/ukrainian", "utf-8", "uk"),
    "el": ("el", "/usr/share/hunspell/el_GR.dic", "iso8859-7", None),  # num2words has no Greek
}
# Debian packages that hold the word lists (setup.sh installs them with espeak-ng)
APT_PACKAGES = ("espeak-ng", "wamerican", "wngerman", "wfrench", "wspanish", "witalian", "wpolish",
                "wswedish", "wukrainian", "hunspell-ru", "hunspell-el")
SCRIPTS = {"en": "LATIN", "de": "LATIN", "fr": "LATIN", "es": "LATIN", "it": "LATIN", "pl": "LATIN",
           "sv": "LATIN", "ru": "CYRILLIC", "uk": "CYRILLIC", "el": "GREEK"}

# espeak voice variants (espeak-ng-data/voices/!v). The held-out ones never speak a training utterance.
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt", "klatt2",
                  "adam", "Andy", "belinda", "benjamin", "david", "john", "linda", "max", "paul", "robert")
HELDOUT_VARIANTS = ("m7", "f5", "klatt3", "steph", "edward")
RATE_WPM = (165, 225)   # espeak speed, words per minute
PITCH = (30, 70)        # espeak pitch, 0-99
PAUSE_S = (0.2, 0.6)    # silence between the phrases of a multi-phrase utterance


# ---------------------------------------------------------------------------- words and sentences

def read_words(lang: str, count: int, seed: int, min_len: int = 3, max_len: int = 8) -> list[str]:
    """`count` distinct lowercase words of one script from the language's word list, drawn with `seed`."""
    _, path, encoding, _ = LANGUAGES[lang]
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} (word list for {lang}) is missing: install the Debian packages "
                                f"{' '.join(APT_PACKAGES)} (bash setup.sh does)")
    rng = random.Random(f"{seed}-{lang}")
    with open(path, encoding=encoding, errors="replace") as f:
        lines = f.read().splitlines()
    if len(lines) > 100_000:  # Polish has 4.3M forms: checking a random 100k is plenty and 10x faster
        lines = rng.sample(lines, 100_000)
    words = set()
    for line in lines:
        w = line.split("/")[0].strip()  # hunspell lines are word/FLAGS; its first line is a count
        if (min_len <= len(w) <= max_len and w.isalpha() and w == w.lower()
                and all(SCRIPTS[lang] in unicodedata.name(c, "") for c in w)):
            words.add(w)
    if len(words) < count:
        raise ValueError(f"{path} has only {len(words)} usable words for {lang}, {count} asked for")
    return rng.sample(sorted(words), count)


def make_phrase(rng: random.Random, lang: str, words: list[str], min_words: int, max_words: int,
                number_prob: float = 0.15) -> str:
    """A few random words from the vocabulary; sometimes a number spelled out by num2words."""
    out = [rng.choice(words) for _ in range(rng.randint(min_words, max_words))]
    number_lang = LANGUAGES[lang][3]
    if number_lang and rng.random() < number_prob:
        from num2words import num2words
        out.insert(rng.randrange(len(out) + 1), num2words(rng.randint(0, 99), lang=number_lang))
    return " ".join(out)


# ---------------------------------------------------------------------------- speech

class Espeak:
    """libespeak-ng in synchronous mode: speak(text, voice, rate, pitch) -> int16 samples at `sample_rate`."""
    _lock = threading.Lock()  # the library keeps global state

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as e:
            raise RuntimeError("libespeak-ng is not installed: run `bash setup.sh` (apt-get install espeak-ng)") from e
        self.sample_rate = self.lib.espeak_Initialize(0x02, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed: is espeak-ng-data installed?")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        with self._lock:
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(1, rate, 0)   # espeakRATE
            self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
            data = text.encode() + b"\0"
            # POS_CHARACTER=1, espeakCHARS_UTF8=1
            if self.lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None) != 0:
                raise RuntimeError(f"espeak_Synth failed on {text!r}")
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def trim_silence(audio: np.ndarray, threshold: float = 0.01, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading and trailing near-silence (espeak ends each utterance with ~0.3 s of it), keeping a margin."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if len(loud) == 0:
        return audio[:0]
    margin = int(margin_s * SAMPLE_RATE)
    return audio[max(0, loud[0] - margin): loud[-1] + margin]


def synthesize(espeak: Espeak, phrases: list[str], voice: str, rng: random.Random) -> tuple[np.ndarray, list[dict]]:
    """Speak the phrases with pauses between them: (float32 audio at 16 kHz, segments with start/end in s)."""
    rate, pitch = rng.randint(*RATE_WPM), rng.randint(*PITCH)
    pieces, segments, t = [], [], 0.0
    for i, phrase in enumerate(phrases):
        if i:
            pause = np.zeros(int(rng.uniform(*PAUSE_S) * SAMPLE_RATE), np.float32)
            pieces.append(pause)
            t += len(pause) / SAMPLE_RATE
        raw = espeak.speak(phrase, voice, rate, pitch).astype(np.float32) / 32768.0
        audio = trim_silence(soxr.resample(raw, espeak.sample_rate, SAMPLE_RATE))
        if len(audio) == 0:
            raise RuntimeError(f"espeak-ng produced silence for {phrase!r} ({voice})")
        pieces.append(audio)
        segments.append({"start": round(t, 2), "end": round(t + len(audio) / SAMPLE_RATE, 2), "text": phrase})
        t += len(audio) / SAMPLE_RATE
    return np.concatenate(pieces), segments


def flac_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------------------- splits

def make_utterance(rng: random.Random, lang: str, words: list[str], multi_prob: float) -> list[str]:
    """The phrases of one utterance: one phrase of 2-4 words, or (multi_prob) 2-3 phrases of 1-3 words."""
    if rng.random() < multi_prob:
        return [make_phrase(rng, lang, words, 1, 3) for _ in range(rng.randint(2, 3))]
    return [make_phrase(rng, lang, words, 2, 4)]


def plan_split(vocab: dict[str, list[str]], per_language: int, variants: tuple, seed: int, multi_prob: float,
               exclude: set[str]) -> list[tuple]:
    """What to speak: per_language utterances per language (interleaved), never a text in `exclude` nor one
    twice, as (key, language, phrases, voice, seed for the voice's speed, pitch and pauses)."""
    rng, texts, plan = random.Random(seed), set(), []
    for i in range(per_language * len(vocab)):
        lang = list(vocab)[i % len(vocab)]
        phrases = make_utterance(rng, lang, vocab[lang], multi_prob)
        while " ".join(phrases) in exclude or " ".join(phrases) in texts:
            phrases = make_utterance(rng, lang, vocab[lang], multi_prob)
        texts.add(" ".join(phrases))
        plan.append((f"{lang}-{i:07d}", lang, phrases, f"{LANGUAGES[lang][0]}+{rng.choice(variants)}", rng.random()))
    return plan


_espeak: Espeak | None = None  # one per worker process


def speak_utterance(item: tuple) -> dict:
    """One planned utterance -> a shard sample {"__key__", "flac", "json"}."""
    global _espeak
    if _espeak is None:
        _espeak = Espeak()
    key, lang, phrases, voice, seed = item
    audio, segments = synthesize(_espeak, phrases, voice, random.Random(seed))
    meta = {"text": " ".join(phrases), "language": lang, "duration": round(len(audio) / SAMPLE_RATE, 3), "voice": voice}
    if len(segments) > 1:
        meta["segments"] = segments
    return {"__key__": key, "flac": flac_bytes(audio), "json": json.dumps(meta, ensure_ascii=False).encode()}


def write_split(out: Path, plan: list[tuple], num_workers: int, desc: str) -> dict:
    """Speak the plan in `num_workers` processes and write it, in order, as shards under `out`.
    Returns per-language {"count", "seconds"}."""
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0))
        if num_workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(num_workers))
            samples = pool.imap(speak_utterance, plan, chunksize=32)
        else:
            samples = map(speak_utterance, plan)
        for (_, lang, *_), sample in zip(plan, tqdm(samples, total=len(plan), desc=desc, unit="utt", mininterval=2)):
            sink.write(sample)
            entry = stats.setdefault(lang, {"count": 0, "seconds": 0.0})
            entry["count"] += 1
            entry["seconds"] = round(entry["seconds"] + json.loads(sample["json"])["duration"], 3)
    return stats


def write_synthetic_asr(out: str | Path, per_language: int = 600, heldout_per_language: int = 40,
                        words_per_language: int = 60, languages: tuple[str, ...] = tuple(LANGUAGES),
                        multi_prob: float = 0.3, seed: int = 0, num_workers: int = 2) -> dict:
    """Write train and held-out splits and info.json under `out`; returns the info dict. The shards are
    the same for any num_workers (processes speaking in parallel)."""
    out = Path(out)
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"no built-in speech for {unknown}; choose from {list(LANGUAGES)}")
    Espeak()  # fail here, clearly, if libespeak-ng is missing
    vocab = {lang: read_words(lang, words_per_language, seed) for lang in languages}
    # held-out sentences first, so that training can be told to avoid them
    heldout_plan = plan_split(vocab, heldout_per_language, HELDOUT_VARIANTS, seed + 1, multi_prob, set())
    train_plan = plan_split(vocab, per_language, TRAIN_VARIANTS, seed, multi_prob,
                            {" ".join(phrases) for _, _, phrases, _, _ in heldout_plan})
    heldout = write_split(out / "heldout", heldout_plan, num_workers, "held-out speech")
    train = write_split(out / "train", train_plan, num_workers, "train speech")
    info = {"version": INFO_VERSION, "per_language": per_language, "heldout_per_language": heldout_per_language,
            "words_per_language": words_per_language, "languages": list(languages), "multi_prob": multi_prob,
            "seed": seed, "train_variants": list(TRAIN_VARIANTS), "heldout_variants": list(HELDOUT_VARIANTS),
            "train": train, "heldout": heldout,
            "train_hours": round(sum(s["seconds"] for s in train.values()) / 3600, 3)}
    (out / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info


def ensure_synthetic_asr(out: str | Path, **kwargs) -> dict:
    """Write the data unless a complete copy with the same settings is already there."""
    info_path = Path(out) / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        want = {"version": INFO_VERSION, **{k: v for k, v in kwargs.items() if k != "num_workers"}}
        if "languages" in want:
            want["languages"] = list(want["languages"])
        if all(info.get(k) == v for k, v in want.items()):
            return info
        info_path.unlink()  # settings changed: the old shards are rewritten, not mixed in
    for split in ("train", "heldout"):
        for old in (Path(out) / split).glob("shard-*.tar"):
            old.unlink()
    return write_synthetic_asr(out, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/asr_synth")
    p.add_argument("--per_language", type=int, default=600, help="training utterances per language")
    p.add_argument("--heldout_per_language", type=int, default=40)
    p.add_argument("--words_per_language", type=int, default=60, help="vocabulary drawn from each word list")
    p.add_argument("--languages", default=",".join(LANGUAGES), help=f"comma-separated, from {','.join(LANGUAGES)}")
    p.add_argument("--multi_prob", type=float, default=0.3, help="share of multi-phrase utterances with segments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2, help="processes speaking in parallel")
    a = p.parse_args(argv)
    info = write_synthetic_asr(a.out, a.per_language, a.heldout_per_language, a.words_per_language,
                               tuple(a.languages.split(",")), a.multi_prob, a.seed, a.num_workers)
    print(json.dumps({k: v for k, v in info.items() if k not in ("train", "heldout")}))


if __name__ == "__main__":
    main()
