"""Write speech and its transcripts as WebDataset tar shards that mm's ASR loader (mm.decoders.audio_decoder) reads.

    list items -> [shuffle, cap] -> read/fetch audio, down-mix, resample to 16 kHz, encode FLAC (a thread pool)
        -> ShardWriter

Three kinds of input (`--kind=auto` tells them apart; `--kind=manifest|commonvoice|librispeech` forces one):

  manifest     a .csv/.tsv/.jsonl file with an audio column (a path relative to the manifest's folder, an absolute
               path, or an http(s):// URL; `--audio_key`, and NeMo's `audio_filepath` is found too), a transcript
               column (`--text_key`) and a language column (`--language_key`; `--language` when it is absent or
               blank). A JSONL line may carry "segments": [{"start", "end", "text"}] (seconds), checked and kept.
  commonvoice  a Common Voice language folder: `<split>.tsv` (`--split`, default validated) and `clips/*.mp3`.
               The language is the `locale` column, else `--language`, else the folder's name.
  librispeech  a LibriSpeech split folder: `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` (lines
               `<utt-id> TRANSCRIPT`) next to `<utt-id>.flac`. The language is `--language`, else "en"; the
               transcripts are kept as given (upper case) unless `--lowercase=true`.

Each sample is {"__key__": "000000042", "flac": 16 kHz mono 16-bit FLAC bytes, "json": {"text", "language",
"duration" (seconds, to the ms), "source" (the item's path or reference in the input)[, "segments"]}}. Audio
is down-mixed and resampled on write, so the loader never resamples. A bad item is counted under its reason
in `<output>/stats.json`, never fatal: missing_file, download_failed, unreadable_audio, empty_audio, too_long
(over `--max_seconds`), too_short, too_large, empty_transcript, bad_row, bad_segments. The stats also hold
the hours written, in all and per language (null languages counted as "unknown"). Items are
shuffled with a fixed seed, keys are a running index and FLAC encoding is deterministic, so a re-run writes
byte-identical shards. Writing nothing at all is an error (`NothingWritten`; the CLI exits non-zero).

    python -m data_tools.write_asr_shards --input=cv-corpus-17.0/en --output=shards/cv-en --max_count=2000
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import soundfile
import webdataset as wds
from tqdm import tqdm

from data_tools.write_shards import (MANIFEST_EXTS, SHARD_PATTERN, SHUFFLE_SEED, SampleError, map_ordered,
                                     parse_bool, read_manifest_rows, record_failure, remove_stale_shards, walk_files)
from mm.decoders import DEFAULT_MAX_AUDIO_BYTES
from mm.media import (SAMPLE_RATE, AudioTooLong, EmptyAudio, NotAudio, RefTooLarge, UnreadableRef, load_audio,
                      read_ref)

KINDS = ("auto", "manifest", "commonvoice", "librispeech")
SPLITS = ("validated", "train", "dev", "test")  # Common Voice's TSVs
SEGMENT_SLACK_S = 0.01  # a segment may end this far past the audio: timestamps are often rounded up to 10 ms
NO_LANGUAGE = "unknown"  # how stats.json counts samples written with language null


class NothingWritten(ValueError):
    """Not one sample could be written. `stats` says why (stats.json is written too)."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


@dataclass
class AudioItem:
    """One utterance, before its audio is read."""
    source: str  # how stats.json and the sample's json name it: a path relative to the input, or the manifest's value
    audio: str  # a local path or an http(s) URL
    text: str
    language: str | None
    segments: object = None  # a JSONL line's "segments" as given; checked once the audio's duration is known


# ---------------------------------------------------------------- listing the input

def detect_asr_kind(path: str, split: str = "validated") -> str:
    """"manifest" for a .csv/.tsv/.jsonl file; "commonvoice" for a folder with `<split>.tsv` and `clips/`;
    "librispeech" for a folder with a `*.trans.txt` at any depth."""
    if os.path.isfile(path):
        if path.lower().endswith(MANIFEST_EXTS):
            return "manifest"
        raise ValueError(f"{path} is a file but not a manifest (one of {', '.join(MANIFEST_EXTS)})")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input {path} does not exist")
    if os.path.isfile(os.path.join(path, f"{split}.tsv")) and os.path.isdir(os.path.join(path, "clips")):
        return "commonvoice"
    if any(f.endswith(".trans.txt") for f in walk_files(path)):
        return "librispeech"
    raise ValueError(f"cannot tell what {path} holds: no {split}.tsv and clips/ (Common Voice), no *.trans.txt "
                     f"(LibriSpeech); a manifest is a {'/'.join(MANIFEST_EXTS)} file. Name it with --kind=")


def manifest_columns(path: str) -> list[str]:
    """The header of a CSV/TSV manifest, or the keys of a JSONL manifest's first object line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if not path.lower().endswith(".jsonl"):
            return csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",").fieldnames or []
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                return list(row)
    return []


def resolve_audio_key(path: str, audio_key: str, text_key: str) -> str:
    """`audio_key`, or NeMo's "audio_filepath" when the default "audio" is absent; fails at once, listing the
    manifest's columns, when the audio or the text column is missing."""
    columns = manifest_columns(path)
    if audio_key == "audio" and "audio" not in columns and "audio_filepath" in columns:
        audio_key = "audio_filepath"
    missing = [k for k in (audio_key, text_key) if k not in columns]
    if missing:
        raise ValueError(f"manifest {path} has no column {' or '.join(map(repr, missing))}; it has {sorted(columns)}. "
                         "Name them with --audio_key= and --text_key=")
    return audio_key


def list_manifest_items(path: str, audio_key: str, text_key: str, language_key: str,
                        language: str | None) -> tuple[list[AudioItem], list[tuple[str, SampleError]]]:
    """Items of a manifest, plus (source, error) for rows that cannot be items."""
    audio_key = resolve_audio_key(path, audio_key, text_key)
    base = os.path.dirname(os.path.abspath(path))
    items, bad = [], []
    for line, row in read_manifest_rows(path, audio_key, text_key):
        try:
            items.append(manifest_item(row, base, audio_key, text_key, language_key, language))
        except SampleError as e:
            bad.append((f"{os.path.basename(path)}:{line}", e))
    return items, bad


def manifest_item(row: dict | None, base: str, audio_key: str, text_key: str, language_key: str,
                  language: str | None) -> AudioItem:
    """One manifest row -> an item; SampleError("bad_row") when it names no audio or holds non-text values."""
    if row is None:
        raise SampleError("bad_row", "not a JSON object")
    audio, text, row_language = row.get(audio_key), row.get(text_key), row.get(language_key)
    if not isinstance(audio, str) or not audio.strip():
        raise SampleError("bad_row", f"no {audio_key}")
    for key, value in ((text_key, text), (language_key, row_language)):
        if value is not None and not isinstance(value, str):
            raise SampleError("bad_row", f"{key} is a {type(value).__name__}, not text")
    audio = audio.strip()
    remote = audio.startswith(("http://", "https://"))
    return AudioItem(source=audio, audio=audio if remote else os.path.join(base, audio), text=text or "",
                     language=(row_language or "").strip() or language, segments=row.get("segments"))


def list_commonvoice_items(root: str, split: str, language: str | None) -> tuple[list[AudioItem], list]:
    """Items of a Common Voice language folder's `<split>.tsv`, plus (source, error) for rows naming no clip."""
    tsv = os.path.join(root, f"{split}.tsv")
    fallback = language or os.path.basename(os.path.normpath(os.path.abspath(root)))
    items, bad = [], []
    with open(tsv, newline="", encoding="utf-8-sig") as f:
        # QUOTE_NONE: Common Voice does not quote its fields, and a sentence may start with a quotation mark
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in ("path", "sentence") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{tsv} has no column {' or '.join(map(repr, missing))}; it has {reader.fieldnames}: "
                             "not a Common Voice TSV")
        for row in reader:
            clip = (row.get("path") or "").strip()
            if not clip:
                bad.append((f"{split}.tsv:{reader.line_num}", SampleError("bad_row", "no path")))
                continue
            items.append(AudioItem(source=f"clips/{clip}", audio=os.path.join(root, "clips", clip),
                                   text=row.get("sentence") or "",
                                   language=(row.get("locale") or "").strip() or fallback))
    return items, bad


def list_librispeech_items(root: str, language: str | None, lowercase: bool) -> tuple[list[AudioItem], list]:
    """Items of every `*.trans.txt` under `root`, each line `<utt-id> TRANSCRIPT` naming `<utt-id>.flac` beside it."""
    items = []
    for rel in walk_files(root):
        if not rel.endswith(".trans.txt"):
            continue
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for line in f:
                utterance, _, text = line.strip().partition(" ")
                if utterance:
                    source = os.path.join(os.path.dirname(rel), utterance + ".flac")
                    items.append(AudioItem(source=source, audio=os.path.join(root, source),
                                           text=text.lower() if lowercase else text, language=language or "en"))
    return items, []


def list_asr_items(input: str, kind: str, split: str, audio_key: str, text_key: str, language_key: str,
                   language: str | None, lowercase: bool) -> tuple[list[AudioItem], list]:
    """(items, (source, error) of unusable rows) for a resolved `kind`."""
    if kind == "manifest":
        return list_manifest_items(input, audio_key, text_key, language_key, language)
    if kind == "commonvoice":
        return list_commonvoice_items(input, split, language)
    if kind == "librispeech":
        return list_librispeech_items(input, language, lowercase)
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")


# ---------------------------------------------------------------- one item -> one sample

def read_audio(item: AudioItem, max_seconds: float | None) -> np.ndarray:
    """The item's audio as float32 [T] mono at 16 kHz; SampleError under a reason when it cannot be."""
    try:
        remote = item.audio.startswith(("http://", "https://"))
        source = read_ref(item.audio, None, DEFAULT_MAX_AUDIO_BYTES) if remote else item.audio
        return load_audio(source, SAMPLE_RATE, max_seconds, name=item.source)
    except FileNotFoundError:
        raise SampleError("missing_file", item.source) from None
    except AudioTooLong as e:
        raise SampleError("too_long", str(e)) from None
    except EmptyAudio as e:  # before NotAudio, its parent
        raise SampleError("empty_audio", str(e)) from None
    except NotAudio as e:
        raise SampleError("unreadable_audio", str(e)) from None
    except RefTooLarge as e:  # before UnreadableRef, its parent
        raise SampleError("too_large", str(e)) from None
    except UnreadableRef as e:
        raise SampleError("download_failed", str(e)) from None
    except OSError as e:
        raise SampleError("unreadable_audio", f"{item.source}: {type(e).__name__}: {e}") from None


def check_segments(segments, duration: float) -> list[dict]:
    """A JSONL line's "segments" as [{"start", "end", "text"}]; SampleError("bad_segments") unless each is an
    object with numbers of seconds 0 <= start < end <= duration (+ SEGMENT_SLACK_S) and a text string."""
    if not isinstance(segments, list):
        raise SampleError("bad_segments", f"segments must be a list, got {type(segments).__name__}")
    out = []
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict):
            raise SampleError("bad_segments", f"segment {i} is a {type(segment).__name__}, not an object")
        start, end, text = segment.get("start"), segment.get("end"), segment.get("text")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in (start, end)):
            raise SampleError("bad_segments", f"segment {i}: start and end must be seconds, got {start!r}, {end!r}")
        if not 0 <= start < end <= duration + SEGMENT_SLACK_S:
            raise SampleError("bad_segments", f"segment {i}: {start:g}..{end:g} s is not 0 <= start < end <= "
                                              f"{duration:.3f} s (the audio's duration)")
        if not isinstance(text, str):
            raise SampleError("bad_segments", f"segment {i}: text must be a string, got {type(text).__name__}")
        out.append({"start": float(start), "end": float(end), "text": text})
    return out


def encode_flac(audio: np.ndarray) -> bytes:
    """float32 [T] at 16 kHz -> 16-bit FLAC bytes (soundfile clips past full scale). The same samples always
    give the same bytes: no date or other varying metadata is written."""
    out = io.BytesIO()
    soundfile.write(out, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def build_sample(item: AudioItem, max_seconds: float | None, min_seconds: float) -> tuple[dict, dict]:
    """An item -> ({"flac", "json"} bytes, the json as a dict). The transcript is checked first: no audio is
    read or downloaded for an item without one."""
    text = item.text.strip()
    if not text:
        raise SampleError("empty_transcript", item.source)
    audio = read_audio(item, max_seconds)
    seconds = len(audio) / SAMPLE_RATE
    if seconds < min_seconds:
        raise SampleError("too_short", f"{item.source}: {seconds:.3f} s is under the minimum of {min_seconds:g} s")
    meta = {"text": text, "language": item.language, "duration": round(seconds, 3), "source": item.source}
    if item.segments is not None:
        meta["segments"] = check_segments(item.segments, seconds)
    sample = {"flac": encode_flac(audio), "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
    return sample, meta


def try_build_sample(item: AudioItem, max_seconds: float | None, min_seconds: float):
    """(item, (sample, meta), None) or (item, None, the SampleError)."""
    try:
        return item, build_sample(item, max_seconds, min_seconds), None
    except SampleError as e:
        return item, None, e


# ---------------------------------------------------------------- writing

def add_written(stats: dict, meta: dict) -> None:
    """Count one written sample, in all and under its language; durations summed in seconds (hours at the end)."""
    stats["written"] += 1
    stats["seconds"] += meta["duration"]
    per_language = stats["languages"].setdefault(meta["language"] or NO_LANGUAGE, {"count": 0, "seconds": 0.0})
    per_language["count"] += 1
    per_language["seconds"] += meta["duration"]


def finish_stats(stats: dict) -> dict:
    """The stats as stats.json shows them: seconds turned into hours (6 decimals), languages sorted."""
    seconds = stats.pop("seconds")
    languages = {lang: {"count": v["count"], "hours": round(v["seconds"] / 3600, 6)}
                 for lang, v in sorted(stats.pop("languages").items())}
    head = {k: stats.pop(k) for k in ("input", "kind", "written")}
    return {**head, "hours": round(seconds / 3600, 6), "languages": languages, **stats}


def write_asr_shards(input: str, output: str, kind: str = "auto", split: str = "validated", audio_key: str = "audio",
                     text_key: str = "text", language_key: str = "language", language: str | None = None,
                     lowercase: bool = False, max_count: int = 2000, max_size_mb: float = 1000.0,
                     max_seconds: float | None = 30.0, min_seconds: float = 0.0, shuffle: bool = True,
                     max_items: int | None = None, num_workers: int = 8) -> dict:
    """Write the speech at `input` as `<output>/shard-NNNNNN.tar` plus `<output>/stats.json`.

    A shard is closed at `max_count` samples or once it holds `max_size_mb` (10^6 bytes) of payload.
    `max_items` caps the items tried (after shuffling). Returns the stats: {"input", "kind", "written", "hours",
    "languages": {language: {"count", "hours"}}, "failed", "failures": {reason: count}, "examples": [{"source",
    "reason", "detail"}] (the first 20), "shards": [file names]}. Raises NothingWritten when written is 0.
    """
    kind = detect_asr_kind(input, split) if kind == "auto" else kind
    items, bad_rows = list_asr_items(input, kind, split, audio_key, text_key, language_key, language, lowercase)
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(items)
    if max_items is not None:
        items = items[:max_items]
    os.makedirs(output, exist_ok=True)
    remove_stale_shards(output)
    stats = {"input": input, "kind": kind, "written": 0, "seconds": 0.0, "languages": {}, "failed": 0,
             "failures": {}, "examples": [], "shards": []}
    for source, error in bad_rows:
        record_failure(stats, source, error)

    shards: list[str] = []
    writer = wds.ShardWriter(os.path.join(output, SHARD_PATTERN), maxcount=max_count, maxsize=max_size_mb * 1e6,
                             post=lambda path: shards.append(os.path.basename(path)), verbose=0,
                             mtime=0.0)  # a fixed mtime: re-runs give byte-identical tars
    with writer:
        results = map_ordered(lambda item: try_build_sample(item, max_seconds, min_seconds), items, num_workers)
        for item, built, error in tqdm(results, total=len(items), desc=f"writing {kind}", unit="clip"):
            if error is not None:
                record_failure(stats, item.source, error)
                continue
            sample, meta = built
            writer.write({"__key__": f"{stats['written']:09d}", **sample})
            add_written(stats, meta)
    first = os.path.join(output, SHARD_PATTERN % 0)
    if stats["written"] == 0 and os.path.exists(first):  # ShardWriter opens its first shard up front
        os.remove(first)
        shards.clear()
    stats["shards"] = shards
    stats = finish_stats(stats)
    with open(os.path.join(output, "stats.json"), "w", encoding="utf-8") as f:  # languages, examples: any script
        json.dump(stats, f, indent=2, ensure_ascii=False)
    if stats["written"] == 0:
        found = len(items) + len(bad_rows)
        why = f"all {stats['failed']} failed: {stats['failures']}" if found else f"no items found in {input} ({kind})"
        raise NothingWritten(f"nothing written to {output}: {why}; see {output}/stats.json", stats)
    return stats


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.write_asr_shards", allow_abbrev=False,
                                description="Write speech with transcripts as WebDataset shards for mm's ASR recipe.")
    p.add_argument("--input", required=True, help="a .csv/.tsv/.jsonl manifest, a Common Voice language folder, "
                                                  "or a LibriSpeech split folder")
    p.add_argument("--output", required=True, help="folder for shard-NNNNNN.tar and stats.json")
    p.add_argument("--kind", default="auto", choices=KINDS, help="what --input is (default: auto-detect)")
    p.add_argument("--split", default="validated", choices=SPLITS, help="Common Voice: which <split>.tsv to write")
    p.add_argument("--audio_key", default="audio", help="manifest column with the audio path or URL "
                                                        "(NeMo's audio_filepath is found when 'audio' is absent)")
    p.add_argument("--text_key", default="text", help="manifest column with the transcript")
    p.add_argument("--language_key", default="language", help="manifest column with the language code")
    p.add_argument("--language", default=None, help="language where the input names none (LibriSpeech: en; "
                                                    "Common Voice: the folder's name)")
    p.add_argument("--lowercase", type=parse_bool, default=False, help="LibriSpeech: lower-case the transcripts")
    p.add_argument("--max_count", type=int, default=2000, help="samples per shard at most")
    p.add_argument("--max_size_mb", type=float, default=1000.0, help="payload per shard at most, in 10^6 bytes")
    p.add_argument("--max_seconds", type=float, default=30.0, help="longer clips are failures (too_long)")
    p.add_argument("--min_seconds", type=float, default=0.0, help="shorter clips are failures (too_short)")
    p.add_argument("--shuffle", type=parse_bool, default=True, help="shuffle items (fixed seed) before writing")
    p.add_argument("--max_items", type=int, default=None, help="try at most this many items (after shuffling)")
    p.add_argument("--num_workers", type=int, default=8, help="threads reading, decoding, resampling and encoding")
    return p


def main(argv: list[str] | None = None) -> None:
    """The command line. Exits non-zero, with a message, on a bad input or when nothing could be written."""
    args = build_parser().parse_args(argv)
    try:
        stats = write_asr_shards(**vars(args))
    except (ValueError, OSError) as e:  # bad input path or columns, or nothing written: a message, not a traceback
        sys.exit(f"write_asr_shards: {e}")
    print(f"wrote {stats['written']} clips ({stats['hours']:.2f} h) in {len(stats['shards'])} shards to "
          f"{args.output}; {stats['failed']} failed: {stats['failures']}")


if __name__ == "__main__":
    main()
