"""Benchmark: decoding speed of mm.asr against openai-whisper's `transcribe` and transformers' `generate`, on the
same weights and the same held-out audio, in one run on one machine.

    python benchmarks/asr_decode.py --wait_idle=600       # the recorded CPU run: runs/asr on its held-out clips
    python benchmarks/asr_decode.py --per_language=2 --max_new_tokens=32   # smoke run, about a minute
    python benchmarks/asr_decode.py --gpu --sides=        # GPU only: whisper-base dims, batched long-form

Four sides transcribe the same clips (float32 samples at 16 kHz, read from the shards beforehand, not timed):

  mm       `Transcriber.from_checkpoint(run).transcribe_batch`, the run's own settings: each window encoded with
           only its own frames (`pad_to_30s=False`, what a model trained on unpadded clips wants), `--batch_size`
           clips a batch, log-mel included.
  mm 30s   the same with `pad_to_30s=True`: every window zero-padded to 30 s (3000 frames), as both peers must.
  openai   `whisper.transcribe` on each clip in turn (it takes one file), the run's `export/whisper.pt`, its own
           log-mel. It cannot read our vocabulary, so its tokenizer is ours behind its interface (`OpenAITokenizer`,
           as tests/asr_fixtures.py does); nothing else of it is changed.
  hf       `WhisperFeatureExtractor` (pads to 30 s) + `WhisperForConditionalGeneration.generate` on the run's
           `export/hf`, `--batch_size` clips a batch, then our tokenizer's decode of the ids.

What is held equal, knob by knob:
- weights: one training run, in its two exported formats; the program prints the largest logit difference of the
  three loaded models on one 30 s window (0 up to float rounding).
- search: greedy (temperature 0.0 alone, so no fallback on any side; compression-ratio, log-probability and
  no-speech thresholds off, so no window is re-decoded or skipped), one beam, fp32, no timestamps
  (`<|notimestamps|>` on all sides), at most `--max_new_tokens` tokens per window (default 224: openai's
  `sample_len`, n_text_ctx // 2).
- language: each clip's own, given to all sides (no detection). Clips are grouped by language because
  `transcribe_batch` and `generate` take one language per call; both batch the same groups.
- token filters: openai's "-1" suppression (the non-speech symbols and the special tokens) plus every timestamp
  token on all sides, its blank suppression off on all sides (`suppress_blank=False`: the run's BPE writes a word's
  leading space as a token of its own, see Transcriber.from_checkpoint). hf gets the same ids as
  `generation_config.suppress_tokens`. The timestamp tokens are not suppressed by any of the three in text-only
  mode by default, and all three seek loops advance to the last of two consecutive timestamps even then: a window
  decoded as "<|0.00|><|0.00|> text" is decoded again from the same frame, for ever. On runs/asr's held-out
  clips hf's greedy text holds two <|0.00|> in a row on 2 of 400 (its inputs differ, see below), and the first
  hung `generate`; here text-only therefore means text tokens only.
- time: wall seconds from samples to text, feature computation included. `torch.set_num_threads(--threads)` for
  all (one process). The sides alternate: each language group is transcribed by every side in turn, the order
  rotating from group to group, so a change of load on the machine reaches all sides; `--repeats` passes. Each
  side first transcribes two clips untimed (warm-up).
- scores: `mm.asr.metrics.asr_scores` (Whisper's normalisers) on every side's transcripts; "same as openai" is the
  share of clips whose text equals openai's character for character.

What differs, and how it shows: the 30 s padding. whisper.transcribe pads each window's log-mel with zeros
(`pad_or_trim` of the mel in its seek loop; "mm 30s" runs the same seek loop, so it writes openai's texts);
WhisperFeatureExtractor pads the audio with silence and then takes the log-mel, so its padding is the log-mel of
silence (about -0.7 after Whisper's scaling, not 0). A model trained on unpadded clips reads the two differently,
and hf's texts differ. Untimed, on `--check_clips` clips, the program decodes hf's own input features with our
`decode`: the same text as hf's means the difference is the input, not the search.

`--gpu` (CUDA only; skipped with a message otherwise): whisper-base dims with random weights and OpenAI's
multilingual vocabulary, long-form files made of held-out clips end to end, transcribed by `transcribe_many` in
lockstep batches of 30 s windows; audio hours per hour of wall time, fp32, bf16 autocast and bf16 weights (the model
cast, as openai-whisper casts to fp16). Random weights do not end a window as a trained model does, so
<|endoftext|> and the timestamp tokens are suppressed and every window
decodes exactly `--gpu_tokens` tokens (default 100, about what 30 s of speech takes): a fixed load. Ours only: the
peers' long-form paths are not run on the GPU.
Writes <out>/results.json with every figure and every transcript.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import busy_cpu_seconds, machine, wait_for_idle  # noqa: E402
from mm.asr.convert import OpenAITokenizer  # noqa: E402
from mm.asr.logit_filters import suppress_token_ids  # noqa: E402
from mm.asr.metrics import asr_scores  # noqa: E402
from mm.asr.transcriber import Transcriber  # noqa: E402
from mm.shards import read_samples  # noqa: E402

SIDES = ("mm", "mm 30s", "openai", "hf")
# every side: temperature 0 alone, nothing re-decoded or skipped for its compression ratio, log-probability or
# P(no speech); whisper.transcribe and our TranscribeOptions share these names
NO_FALLBACK = dict(temperature=0.0, compression_ratio_threshold=None, logprob_threshold=None,
                   no_speech_threshold=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/asr", help="a recipes/asr run folder with export/hf and export/whisper.pt")
    p.add_argument("--data", default="data/asr_synth/heldout", help="held-out shards (key.flac + key.json)")
    p.add_argument("--per_language", type=int, default=None, help="clips per language (default: all)")
    p.add_argument("--batch_size", type=int, default=16, help="clips per batch, mm and hf")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="most tokens per window, all sides (default n_text_ctx // 2, openai's sample_len)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes over the clips")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, every side")
    p.add_argument("--check_clips", type=int, default=40,
                   help="untimed, on this many clips: does our decode on hf's own input features give hf's text?")
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before timing, wait up to this many seconds for other processes to leave the CPU idle")
    p.add_argument("--gpu", action="store_true", help="long-form throughput of --gpu_model on CUDA")
    p.add_argument("--gpu_model", default="base")
    p.add_argument("--gpu_files", type=int, default=32)
    p.add_argument("--gpu_minutes", type=float, default=10.0, help="length of each long-form file")
    p.add_argument("--gpu_batch_size", type=int, default=32, help="windows decoded together")
    p.add_argument("--gpu_tokens", type=int, default=100, help="tokens decoded per 30 s window")
    p.add_argument("--out", default="runs/bench_asr_decode")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the held-out clips

@dataclass
class Clip:
    audio: np.ndarray  # float32 [T] at 16 kHz
    text: str
    language: str
    duration: float  # seconds


def load_clips(spec: Path, per_language: int | None = None) -> list[Clip]:
    """Every clip of the shards under `spec` (or the first `per_language` of each language), in shard order."""
    import soundfile

    urls = sorted(str(p) for p in spec.glob("*.tar"))
    if not urls:
        raise SystemExit(f"{spec}: no .tar shards (the ASR recipe's built-in corpus: python recipes/asr/train.py)")
    clips, seen = [], {}
    for sample in read_samples(urls, {"bad_shards": 0}):
        meta = json.loads(sample["json"])
        if per_language is not None and seen.get(meta["language"], 0) >= per_language:
            continue
        seen[meta["language"]] = seen.get(meta["language"], 0) + 1
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        if rate != 16000 or audio.ndim != 1:
            raise SystemExit(f"{sample['__key__']}: expected mono 16 kHz, got {rate} Hz, shape {audio.shape}")
        clips.append(Clip(audio, meta["text"], meta["language"], len(audio) / rate))
    return clips


def group_by_language(clips: list[Clip]) -> list[tuple[str, list[int]]]:
    """[(language, indices of its clips)] in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault(c.language, []).append(i)
    return list(groups.items())


# ---------------------------------------------------------------------------- openai-whisper over our tokenizer

@contextlib.contextmanager
def openai_uses_tokenizer(tokenizer):
    """Within: whisper.decoding and whisper.transcribe build OpenAITokenizer(tokenizer) instead of their own."""
    import whisper.decoding

    transcribe_module = sys.modules["whisper.transcribe"]  # `whisper.transcribe` is the function

    def get_tokenizer(multilingual, *, num_languages=99, language=None, task=None):
        return OpenAITokenizer(tokenizer, language, task)

    saved = whisper.decoding.get_tokenizer, transcribe_module.get_tokenizer
    whisper.decoding.get_tokenizer = transcribe_module.get_tokenizer = get_tokenizer
    try:
        yield
    finally:
        whisper.decoding.get_tokenizer, transcribe_module.get_tokenizer = saved


# ---------------------------------------------------------------------------- the sides

# (samples of clips in one language, language) -> (their texts, how many text tokens each one's decode generated)
Side = Callable[[list[np.ndarray], str], tuple[list[str], list[int]]]


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def text_only_suppression(tokenizer) -> list[int]:
    """openai's default "-1" (the non-speech symbols; the special tokens are added by every side) and every
    timestamp token: whisper.decoding's `suppress_tokens` as a list."""
    return [-1, *range(tokenizer.timestamp_begin, tokenizer.vocab_size)]


def ours(asr: Transcriber, pad_to_30s: bool, batch_size: int, max_new_tokens: int, suppress: list[int]) -> Side:
    def transcribe(audios: list[np.ndarray], language: str) -> tuple[list[str], list[int]]:
        found = asr.transcribe_batch(audios, language=language, timestamps=False, batch_size=batch_size,
                                     pad_to_30s=pad_to_30s, sample_len=max_new_tokens, suppress_tokens=suppress,
                                     **NO_FALLBACK)
        return [t.text for t in found], [sum(len(s.tokens) for s in t.segments) for t in found]
    return transcribe


def openai_side(model, tokenizer, max_new_tokens: int, suppress: list[int], suppress_blank: bool) -> Side:
    import whisper

    def transcribe(audios: list[np.ndarray], language: str) -> tuple[list[str], list[int]]:
        with openai_uses_tokenizer(tokenizer):
            found = [whisper.transcribe(model, a, language=language, task="transcribe", fp16=False, verbose=None,
                                        without_timestamps=True, suppress_tokens=suppress,
                                        suppress_blank=suppress_blank,
                                        sample_len=max_new_tokens, **NO_FALLBACK) for a in audios]
        return [r["text"].strip() for r in found], [sum(len(s["tokens"]) for s in r["segments"]) for r in found]
    return transcribe


def hf_side(folder: Path, tokenizer, batch_size: int, max_new_tokens: int, suppress: list[int],
            suppress_blank: bool) -> tuple:
    """(the side, its model, its feature extractor): WhisperFeatureExtractor + generate, the generation config
    given our token ids."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    config = model.generation_config
    config.decoder_start_token_id = tokenizer.sot
    config.eos_token_id = config.pad_token_id = tokenizer.eot
    config.lang_to_id = {f"<|{code}|>": tokenizer.language_token(code) for code in tokenizer.languages}
    config.task_to_id = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
    config.no_timestamps_token_id, config.is_multilingual = tokenizer.no_timestamps, True
    config.suppress_tokens = suppress_token_ids(tokenizer, suppress)  # with the specials openai adds
    # openai's SuppressBlank: the space and <|endoftext|> as the first token (none when suppress_blank is off)
    config.begin_suppress_tokens = tokenizer.encode(" ") + [tokenizer.eot] if suppress_blank else None

    @torch.no_grad()
    def transcribe(audios: list[np.ndarray], language: str) -> tuple[list[str], list[int]]:
        texts, counts = [], []
        for batch in batches(audios, batch_size):
            features = extractor(batch, sampling_rate=16000, return_tensors="pt").input_features
            ids = model.generate(features, language=language, task="transcribe", return_timestamps=False,
                                 max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            text_ids = [[t for t in row if t < tokenizer.eot] for row in ids.tolist()]  # no prompt, eot, padding
            texts += [tokenizer.decode(row).strip() for row in text_ids]
            counts += [len(row) for row in text_ids]
        return texts, counts
    return transcribe, model, extractor


@torch.no_grad()
def weight_differences(asr: Transcriber, openai_model, hf_model, clip: Clip) -> dict[str, float]:
    """Largest |logit difference| against ours of each peer's model, on one clip padded to 30 s."""
    from mm.asr.features import N_FRAMES, log_mel_spectrogram, pad_or_trim

    mel = pad_or_trim(log_mel_spectrogram(torch.as_tensor(clip.audio), asr.model.dims.n_mels), N_FRAMES)[None]
    tokens = torch.tensor([asr.tokenizer.sot_sequence(clip.language) + asr.tokenizer.encode(" " + clip.text)])
    want = asr.model(mel, tokens)
    out = {}
    if openai_model is not None:
        out["openai"] = float((openai_model(mel, tokens) - want).abs().max())
    if hf_model is not None:
        out["hf"] = float((hf_model(input_features=mel, decoder_input_ids=tokens).logits - want).abs().max())
    return out


@torch.no_grad()
def decode_hf_features(asr: Transcriber, extractor, clips: list[Clip], max_new_tokens: int,
                       suppress: list[int]) -> list[str]:
    """Our `decode` on hf's own input features (each clip's audio padded with silence to 30 s before its log-mel),
    with the settings of the timed sides: why hf's texts differ from openai's (which pads the log-mel with zeros)."""
    from mm.asr.decode import DecodingOptions, decode

    options = DecodingOptions(without_timestamps=True, sample_len=max_new_tokens, suppress_tokens=suppress,
                              suppress_blank=asr.defaults.get("suppress_blank", True))
    texts = []
    for language, indices in group_by_language(clips):
        for batch in batches(indices, 16):
            features = extractor([clips[i].audio for i in batch], sampling_rate=16000,
                                 return_tensors="pt").input_features
            texts += [(i, r.text) for i, r in zip(batch, decode(asr.model, asr.tokenizer, features, options,
                                                                  languages=[language] * len(batch)))]
    return [t for _, t in sorted(texts)]


# ---------------------------------------------------------------------------- timing

@dataclass
class Tally:
    wall_s: float = 0.0
    other_cpu_s: float = 0.0  # CPU seconds other processes used while this side ran
    texts: dict[int, str] = field(default_factory=dict)  # clip index -> transcript (first pass)
    tokens: dict[int, int] = field(default_factory=dict)  # clip index -> text tokens generated (first pass)


def run_interleaved(sides: dict[str, Side], clips: list[Clip], repeats: int) -> dict[str, Tally]:
    """Every side transcribes every language group, the sides' order rotating from group to group."""
    groups, names = group_by_language(clips), list(sides)
    tallies = {name: Tally() for name in names}
    for name in names:  # warm-up, untimed
        sides[name]([c.audio for c in clips[:2]], clips[0].language)
    for rep in range(repeats):
        for g, (language, indices) in enumerate(groups):
            shift = (rep * len(groups) + g) % len(names)
            for name in names[shift:] + names[:shift]:
                tally, audios = tallies[name], [clips[i].audio for i in indices]
                busy0, own0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
                texts, tokens = sides[name](audios, language)
                wall = time.perf_counter() - t0
                tally.other_cpu_s += max(0.0, busy_cpu_seconds() - busy0 - (time.process_time() - own0))
                tally.wall_s += wall
                if rep == 0:
                    tally.texts.update(zip(indices, texts))
                    tally.tokens.update(zip(indices, tokens))
            print(f"  pass {rep + 1}/{repeats}, {language} ({len(indices)} clips): "
                  + ", ".join(f"{n} {tallies[n].wall_s:.1f} s" for n in names), flush=True)
    return tallies


def summarise(tallies: dict[str, Tally], clips: list[Clip], repeats: int, max_new_tokens: int) -> dict[str, dict]:
    audio_s = sum(c.duration for c in clips) * repeats
    refs, langs = [c.text for c in clips], [c.language for c in clips]
    base = tallies.get("mm")
    reference = tallies.get("openai")
    rows = {}
    for name, t in tallies.items():
        hyps = [t.texts[i] for i in range(len(clips))]
        scores = asr_scores(refs, hyps, langs)
        row = {"audio_s": audio_s, "wall_s": t.wall_s, "rtf": t.wall_s / audio_s,
               "ratio_vs_mm": t.wall_s / base.wall_s if base else None,
               "wer": scores["wer"], "cer": scores["cer"], "cer_mean": scores["cer_mean"],
               "other_cores": t.other_cpu_s / t.wall_s, "tokens": sum(t.tokens.values()),
               "capped": sum(n >= max_new_tokens for n in t.tokens.values()), "texts": hyps}
        if reference is not None:
            row["same_as_openai"] = sum(h == reference.texts[i] for i, h in enumerate(hyps)) / len(clips)
        rows[name] = row
    return rows


def verdict(rows: dict[str, dict]) -> list[str]:
    """The issue's goal: mm >= 2x the faster peer on CPU, at equal WER; and the same for mm 30s (like for like)."""
    peers = [n for n in ("openai", "hf") if n in rows]
    if not peers:
        return []
    faster = min(peers, key=lambda n: rows[n]["wall_s"])
    lines = []
    for name in (n for n in ("mm", "mm 30s") if n in rows):
        r, p = rows[name], rows[faster]
        speedup = p["wall_s"] / r["wall_s"]
        fast, good = speedup >= 2.0, r["wer"] <= p["wer"] + 1e-9
        lines.append(f"{name}: {speedup:.2f}x the faster peer ({faster}); WER {r['wer']:.4f} vs {p['wer']:.4f} -> goal "
                     f"(>= 2x at equal or better WER) {'MET' if fast and good else 'NOT met'}"
                     + ("" if fast else " (too slow)") + ("" if good else " (worse WER)"))
    return lines


def print_table(rows: dict[str, dict]) -> None:
    print(f"\n{'side':8}{'audio s':>9}{'wall s':>9}{'RTF':>9}{'x mm':>7}{'WER':>8}{'CER':>8}{'mean CER':>10}"
          f"{'same as openai':>16}{'tokens':>8}{'capped':>8}{'others':>8}")
    for name, r in rows.items():
        ratio = f"{r['ratio_vs_mm']:7.2f}" if r["ratio_vs_mm"] is not None else f"{'-':>7}"
        same = f"{r['same_as_openai']:16.1%}" if "same_as_openai" in r else f"{'-':>16}"
        print(f"{name:8}{r['audio_s']:9.1f}{r['wall_s']:9.2f}{r['rtf']:9.4f}{ratio}{r['wer']:8.4f}{r['cer']:8.4f}"
              f"{r['cer_mean']:10.4f}{same}{r['tokens']:8d}{r['capped']:8d}{r['other_cores']:8.2f}")
    print("RTF: wall seconds per second of audio; x mm: the side's wall time over mm's; tokens: text tokens the side\n"
          "generated (first pass); capped: clips whose decode stopped at the token limit, not at <|endoftext|>;\n"
          "others: CPU cores other processes kept busy while the side ran (0 = undisturbed).")


# ---------------------------------------------------------------------------- GPU: batched long-form throughput

def long_files(clips: list[Clip], n_files: int, minutes: float) -> list[np.ndarray]:
    """n_files recordings of `minutes` each: the clips end to end with 0.3 s pauses, each file from its own start."""
    gap = np.zeros(4800, dtype=np.float32)
    joined = np.concatenate([x for c in clips for x in (c.audio, gap)])
    n = round(minutes * 60 * 16000)
    reps = math.ceil(n / len(joined)) + 1
    tiled = np.tile(joined, reps)
    step = len(joined) // max(1, n_files)
    return [tiled[i * step:i * step + n].copy() for i in range(n_files)]


PRECISIONS = ("fp32", "bf16 autocast", "bf16 weights")


def longform_throughput(model_name: str, device: str, audios: list[np.ndarray], batch_size: int, tokens: int,
                        precision: str) -> dict:
    """Audio hours per hour of `transcribe_many` with `model_name` dims, random weights and OpenAI's vocabulary:
    30 s windows (pad_to_30s), greedy, no timestamps, each window exactly `tokens` text tokens (<|endoftext|> and the
    timestamp tokens suppressed: random weights would stop at any step, or cut a window short with timestamps).
    precision: one of PRECISIONS. "bf16 weights" casts the model once, as openai-whisper's fp16 does; autocast keeps
    fp32 weights (it caches their casts, except the tied output projection's view) and casts activations per op."""
    import whisper

    from mm.asr.features import HOP_LENGTH, N_FRAMES
    from mm.asr.model import Whisper, dims_for
    from mm.asr.tokenizer import tokenizer_from_tiktoken
    from mm.asr.transcribe import TranscribeOptions, transcribe_many

    tokenizer = tokenizer_from_tiktoken(Path(whisper.__file__).parent / "assets" / "multilingual.tiktoken")
    torch.manual_seed(0)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    model = Whisper(dims_for(model_name, n_vocab=tokenizer.vocab_size, n_mels=80)).to(device).eval()
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    options = TranscribeOptions(**NO_FALLBACK, pad_to_30s=True, sample_len=tokens, suppress_blank=False,
                                suppress_tokens=[*text_only_suppression(tokenizer), tokenizer.eot])
    dev = torch.device(device)

    def run(files):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            return transcribe_many(model, tokenizer, files, "en", "transcribe", False, options, batch_size)

    run([audios[0][:16000 * 40]])  # warm-up: two windows
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    found = run(audios)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    audio_s = sum(len(a) for a in audios) / 16000
    windows = sum(math.ceil(len(a) // HOP_LENGTH / N_FRAMES) for a in audios)  # 30 s each, the last one shorter
    return {"model": model_name, "dtype": precision, "files": len(audios),
            "audio_h": audio_s / 3600, "wall_s": wall, "audio_hours_per_hour": audio_s / wall, "windows": windows,
            "segments": sum(len(t.segments) for t in found), "batch_size": batch_size, "tokens_per_window": tokens}


# ---------------------------------------------------------------------------- main

def cpu_comparison(args, clips: list[Clip], res: dict) -> None:
    import whisper

    names = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; accepted: {', '.join(SIDES)}")
    run = Path(args.run) if Path(args.run).is_absolute() else ROOT / args.run
    asr = Transcriber.from_checkpoint(run, device="cpu")
    n_ctx = asr.model.dims.n_text_ctx
    max_new = args.max_new_tokens or n_ctx // 2
    suppress_blank, suppress = asr.defaults.get("suppress_blank", True), text_only_suppression(asr.tokenizer)
    print(f"model: {run} ({sum(p.numel() for p in asr.model.parameters()) / 1e6:.2f}M parameters, vocabulary "
          f"{asr.model.dims.n_vocab}); its settings {asr.defaults}; at most {max_new} tokens a window", flush=True)
    sides: dict[str, Side] = {}
    openai_model = hf_model = extractor = None
    for name in names:
        if name == "mm":
            sides[name] = ours(asr, asr.defaults.get("pad_to_30s", True), args.batch_size, max_new, suppress)
        elif name == "mm 30s":
            sides[name] = ours(asr, True, args.batch_size, max_new, suppress)
        elif name == "openai":
            openai_model = whisper.load_model(str(run / "export" / "whisper.pt"), device="cpu")
            sides[name] = openai_side(openai_model, asr.tokenizer, max_new, suppress, suppress_blank)
        else:
            sides[name], hf_model, extractor = hf_side(run / "export" / "hf", asr.tokenizer, args.batch_size,
                                                       max_new, suppress, suppress_blank)
    diffs = weight_differences(asr, openai_model, hf_model, clips[0])
    print("same weights: largest logit difference from ours on one 30 s window: "
          + (", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) or "-"), flush=True)
    if args.wait_idle > 0:
        print(f"  others before timing: {wait_for_idle(args.wait_idle):.2f} cores", flush=True)
    tallies = run_interleaved(sides, clips, args.repeats)
    rows = summarise(tallies, clips, args.repeats, max_new)
    if extractor is not None and args.check_clips > 0:  # untimed: hf's texts are ours on hf's own features
        picked = list(range(0, len(clips), max(1, len(clips) // args.check_clips)))[:args.check_clips]
        texts = decode_hf_features(asr, extractor, [clips[i] for i in picked], max_new, suppress)
        res["hf_features_check"] = {"clips": len(picked),
                                    "same_as_hf": sum(t == rows["hf"]["texts"][i] for t, i in zip(texts, picked))}
    res.update({"model": str(run), "settings": asr.defaults, "max_new_tokens": max_new, "logit_max_diff": diffs,
                "sides": rows, "verdict": verdict(rows)})
    print_table(rows)
    if "hf_features_check" in res:
        c = res["hf_features_check"]
        print(f"our decode on hf's own input features (audio padded with silence, then log-mel) gives hf's text "
              f"on {c['same_as_hf']} of {c['clips']} clips (spread over the set)")
    print("\n".join(res["verdict"]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import whisper
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # generate's notes on deprecated flags and attention masks, each batch
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "transformers": transformers.__version__, "openai_whisper": whisper.__version__}
    with open("/proc/loadavg") as f:
        info["loadavg_before"] = f.read().split()[:3]
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores, GPU {info['gpu']}; torch {info['torch']} "
          f"({args.threads} threads), transformers {info['transformers']}, openai-whisper {info['openai_whisper']}; "
          f"load average {' '.join(info['loadavg_before'])}", flush=True)
    data = Path(args.data) if Path(args.data).is_absolute() else ROOT / args.data
    clips = load_clips(data, args.per_language)
    print(f"{len(clips)} clips, {sum(c.duration for c in clips):.1f} s of audio "
          f"({min(c.duration for c in clips):.2f}-{max(c.duration for c in clips):.2f} s), "
          f"{len(group_by_language(clips))} languages; batches of {args.batch_size}", flush=True)
    res: dict = {"command": " ".join(sys.argv), "config": vars(args), "machine": info, "notes": []}

    if args.sides:
        cpu_comparison(args, clips, res)
    if args.gpu and not torch.cuda.is_available():
        res["notes"].append("--gpu: skipped, CUDA is not available on this machine (no long-form GPU figures).")
    elif args.gpu:
        audios = long_files(clips, args.gpu_files, args.gpu_minutes)
        res["gpu"] = [longform_throughput(args.gpu_model, "cuda", audios, args.gpu_batch_size, args.gpu_tokens,
                                          precision) for precision in PRECISIONS]
        print(f"\nGPU long-form, {args.gpu_model} dims, random weights, {len(audios)} files of "
              f"{args.gpu_minutes:g} min, batches of {args.gpu_batch_size} windows, {args.gpu_tokens} tokens a window:")
        for r in res["gpu"]:
            print(f"  {r['dtype']:14} {r['audio_h']:.2f} h of audio in {r['wall_s']:.1f} s: "
                  f"{r['audio_hours_per_hour']:.0f} audio hours per hour ({r['windows']} windows)")
    for note in res["notes"]:
        print(note)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"figures: {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
