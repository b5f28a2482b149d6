"""Write a chat JSONL (OpenAI fine-tuning format, SFT or preference lines) as WebDataset tar shards with
the images embedded, so training reads local tars instead of thousands of files or URLs.

    lines -> [shuffle] -> parse, fetch each image (a thread pool), check as the loader will -> ShardWriter

Each sample is {"__key__": the line number (9 digits), "json": the line, each image url rewritten to the
name of a field of the sample, "img0.png", "img1.jpg", ...: the image's original bytes, the extension
from the format PIL finds in them}. mm.decoders.chat_decoder reads such a sample like the line itself
(in a tar sample, an image url naming another field of it is that field). The same image twice in a
line (the same bytes, under any urls) is stored once.

Image urls are what the loader accepts: a path relative to the JSONL's folder, an absolute path, file:,
data: or http(s) URLs, read through mm.decoders.fetch_ref with the same size limit. Every sample is
decoded by chat_decoder before it is written, so a line that would be a bad sample in training is
skipped here instead, and counted in `<out>/stats.json` under its reason with its line number:
invalid_json, bad_format (chat_decoder's checks), missing_image, unreadable_image, image_too_large.
Never fatal; writing nothing at all is an error (the CLI exits non-zero).

    python -m data_tools.write_chat_shards data/vlm_synth/train.jsonl --out=shards/vlm_train --per_shard=1000
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_tools.write_shards import (SHARD_PATTERN, SHUFFLE_SEED, SampleError, map_ordered, parse_bool,
                                     remove_stale_shards)
from mm.decoders import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, ChatFormatError, chat_decoder, fetch_ref,
                         parse_json)
from mm.media import DEFAULT_MAX_PIXELS, ImageTooLarge, NotAnImage, RefTooLarge, UnreadableRef

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
MAX_EXAMPLES = 20  # failure examples (with their messages) kept in stats.json; line numbers are all kept


class NothingWritten(ValueError):
    """Not one line could be written. `stats` says why (stats.json is written too)."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


def read_lines(path: str) -> list[tuple[int, bytes]]:
    """(1-based line number, bytes) of each non-blank line: the loader's numbering ("<stem>:<line>")."""
    with open(path, "rb") as f:
        return [(i, line) for i, line in enumerate(f, 1) if line.strip()]


def image_parts(record) -> list[dict]:
    """The image_url parts of a chat line, in the order chat_decoder numbers them (input messages, then
    the outputs, for a preference line). Tolerant of a malformed line: the decoder judges it later."""
    if not isinstance(record, dict):
        return []
    source = record.get("input") if "messages" not in record else record
    groups = [source.get("messages") if isinstance(source, dict) else None]
    if "messages" not in record:
        groups += [record.get("preferred_output"), record.get("non_preferred_output")]
    contents = [m.get("content") for messages in groups if isinstance(messages, list)
                for m in messages if isinstance(m, dict)]
    return [p for content in contents if isinstance(content, list) for p in content if is_image_part(p)]


def is_image_part(part) -> bool:
    """An {"type": "image_url", "image_url": {"url": non-empty string}} part."""
    image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
    return isinstance(image, dict) and isinstance(image.get("url"), str) and bool(image["url"])


def image_extension(data: bytes) -> str:
    """"png", "jpg", ... from the format in the bytes (not from the url, which may lie or have none)."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            return EXTENSIONS.get(im.format, (im.format or "img").lower())
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise NotAnImage(f"not an image ({type(e).__name__})") from None


def embed_images(source: dict, record: dict, max_images: int, max_image_bytes: int) -> dict[str, bytes]:
    """Fetch each image of `record` (seen from the manifest-style `source` sample), rewrite its url in
    place to a field name, and return {field name: bytes}."""
    parts = image_parts(record)
    if len(parts) > max_images:  # refused before fetching dozens of images
        raise ChatFormatError(f"{len(parts)} images, over the limit of {max_images}")
    fields, by_url, by_bytes = {}, {}, {}
    for part in parts:
        url = part["image_url"]["url"]
        if url not in by_url:
            data = fetch_ref(source, url, max_image_bytes)
            if data not in by_bytes:  # one file under several urls (relative, absolute, file:) is stored once
                by_bytes[data] = f"img{len(by_bytes)}.{image_extension(data)}"
                fields[by_bytes[data]] = data
            by_url[url] = by_bytes[data]
        part["image_url"]["url"] = by_url[url]
    return fields


def failure_reason(error: Exception) -> str:
    """The stats.json category of an error raised while building a sample (order matters: subclasses first)."""
    for kind, reason in ((ChatFormatError, "bad_format"), (FileNotFoundError, "missing_image"),
                         (RefTooLarge, "image_too_large"), (ImageTooLarge, "image_too_large"),
                         (UnreadableRef, "unreadable_image"), (NotAnImage, "unreadable_image")):
        if isinstance(error, kind):
            return reason
    return "bad_format"


def build_sample(path: str, line_no: int, line: bytes, limits: dict) -> dict[str, bytes]:
    """One line -> {"__key__", "json", "img0.<ext>", ...}, checked by chat_decoder(**limits) exactly as the
    loader will read it back (limits: max_pixels, max_images, max_image_bytes). SampleError(reason) when
    the line cannot become a sample."""
    stem = os.path.basename(path).rsplit(".", 1)[0]
    source = {"__key__": f"{stem}:{line_no}", "__url__": path, "__root__": os.path.dirname(os.path.abspath(path)),
              "json": line}
    try:
        record = parse_json(source, "chat json")
    except ValueError as e:
        raise SampleError("invalid_json", str(e)) from None
    try:
        fields = embed_images(source, record, limits["max_images"], limits["max_image_bytes"])
        sample = {"__key__": f"{line_no:09d}", "json": json.dumps(record, ensure_ascii=False).encode("utf-8"), **fields}
        chat_decoder(**limits)(sample)  # format checks, image decoding and pixel limits, on what will be written
    except (ValueError, FileNotFoundError) as e:  # the decoder's and media's errors are all one of these
        raise SampleError(failure_reason(e), str(e)) from None
    return sample


def try_build_sample(path: str, line_no: int, line: bytes, limits: dict):
    try:
        return line_no, build_sample(path, line_no, line, limits), None
    except SampleError as e:
        return line_no, None, e


def record_failure(stats: dict, line_no: int, error: SampleError) -> None:
    stats["failed"] += 1
    stats["failures"][error.reason] = stats["failures"].get(error.reason, 0) + 1
    stats["failed_lines"].setdefault(error.reason, []).append(line_no)
    if len(stats["examples"]) < MAX_EXAMPLES:
        stats["examples"].append({"line": line_no, "reason": error.reason, "detail": error.detail})


def write_chat_shards(input: str, out: str, per_shard: int = 1000, max_size_mb: float = 1000.0,
                      shuffle: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, max_images: int = DEFAULT_MAX_IMAGES,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, num_workers: int = 8) -> dict:
    """Write the chat JSONL `input` as `<out>/shard-NNNNNN.tar` plus `<out>/stats.json`; returns the stats:
    {"input", "lines", "written", "images", "failed", "failures": {reason: count}, "failed_lines": {reason:
    [line numbers]}, "examples": [{"line", "reason", "detail"}] (the first 20), "shards": [file names]}.
    A shard is closed at `per_shard` samples or `max_size_mb` (10^6 bytes). Lines are shuffled with a fixed
    seed (a re-run writes byte-identical shards). Raises NothingWritten when no line could be written."""
    lines = read_lines(input)
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(lines)
    os.makedirs(out, exist_ok=True)
    remove_stale_shards(out)
    limits = {"max_pixels": max_pixels, "max_images": max_images, "max_image_bytes": max_image_bytes}
    stats = {"input": input, "lines": len(lines), "written": 0, "images": 0, "failed": 0, "failures": {},
             "failed_lines": {}, "examples": [], "shards": []}
    shards: list[str] = []
    writer = wds.ShardWriter(os.path.join(out, SHARD_PATTERN), maxcount=per_shard, maxsize=max_size_mb * 1e6,
                             post=lambda p: shards.append(os.path.basename(p)), verbose=0, mtime=0.0)
    with writer:
        results = map_ordered(lambda item: try_build_sample(input, *item, limits), lines, num_workers)
        for line_no, sample, error in tqdm(results, total=len(lines), desc="writing chats", unit="line"):
            if error is not None:
                record_failure(stats, line_no, error)
                continue
            writer.write(sample)
            stats["written"] += 1
            stats["images"] += sum(k.startswith("img") for k in sample)
    if stats["written"] == 0 and os.path.exists(os.path.join(out, SHARD_PATTERN % 0)):  # opened up front
        os.remove(os.path.join(out, SHARD_PATTERN % 0))
        shards.clear()
    stats["shards"] = shards
    for numbers in stats["failed_lines"].values():
        numbers.sort()
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
    if stats["written"] == 0:
        raise NothingWritten(f"nothing written to {out}: {stats['lines']} lines, failures {stats['failures']}; "
                             f"see {out}/stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.write_chat_shards", allow_abbrev=False,
                                description="Write a chat JSONL as WebDataset shards with the images embedded.")
    p.add_argument("input", help="an OpenAI chat JSONL (SFT or preference lines)")
    p.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and stats.json")
    p.add_argument("--per_shard", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max_size_mb", type=float, default=1000.0, help="payload per shard at most, in 10^6 bytes")
    p.add_argument("--shuffle", type=parse_bool, default=True, help="shuffle lines (fixed seed) before writing")
    p.add_argument("--num_workers", type=int, default=8, help="threads fetching and checking images")
    args = p.parse_args(argv)
    try:
        stats = write_chat_shards(**vars(args))
    except (ValueError, OSError) as e:  # a missing input, or nothing written: a message, not a traceback
        sys.exit(f"write_chat_shards: {e}")
    print(f"wrote {stats['written']} lines ({stats['images']} images) in {len(stats['shards'])} shards to "
          f"{args.out}; {stats['failed']} failed: {stats['failures']}")


if __name__ == "__main__":
    main()
