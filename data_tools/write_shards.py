"""Write your own image-caption data as WebDataset tar shards that mm's loader (mm/shards.py) reads.

    list items -> [shuffle] -> read caption, read/fetch image, resize, re-encode (a thread pool) -> ShardWriter

Three kinds of input (`--kind=auto` tells them apart; `--kind=folder|manifest|classes` forces one):

  folder    images with sidecar captions, at any depth: `cat.jpg` + `cat.txt`
  manifest  a .csv/.tsv/.jsonl file with an image column (a path relative to the manifest's folder,
            an absolute path, or an http(s):// URL) and a caption column (`--image_key`, `--caption_key`)
  classes   `root/<class_name>/*.jpg`: the caption is the class name ("golden_retriever" -> "golden retriever"),
            and a `json` field {"label": class_name, "label_index": i} (classes sorted) is written too

Each sample is {"__key__": "000000042", "jpg": JPEG bytes (quality 95, RGB), "txt": caption, ["json"]}.
Images are resized on write (shorter side to `--image_size`, never upscaled; 0 keeps the size).
A bad item (unreadable image, missing file, failed download, no or empty caption) is counted under a reason
in `<output>/stats.json`, never fatal. Items are shuffled with a fixed seed before writing (so a shard holds a
mix, not one class or one source) and keys are a running index, so a re-run writes byte-identical shards.

    python -m data_tools.write_shards --input=photos/ --output=shards/ --image_size=256
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import random
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from mm.config import parse_bool  # re-exported: the other data tools import it from here
from mm.media import IMAGE_EXTENSIONS  # one list of image file types for the whole kit

KINDS = ("auto", "folder", "manifest", "classes")
MANIFEST_EXTS = (".csv", ".tsv", ".jsonl")
SHARD_PATTERN = "shard-%06d.tar"
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
JPEG_QUALITY = 95
DOWNLOAD_TIMEOUT_S = 20.0
MAX_EXAMPLES = 20  # failure examples kept in stats.json
SHUFFLE_SEED = 0
USER_AGENT = "mm-write-shards/0.1"  # some hosts refuse urllib's default agent


class SampleError(Exception):
    """One item that cannot become a sample. `reason` is the short category counted in stats.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    """One input item, before anything is read."""
    source: str  # how stats.json names it: a path relative to the input, or the manifest's image value
    image: str  # a local path or an http(s) URL
    caption: str | None = None  # the caption text, or None to read it from caption_file
    caption_file: str | None = None  # a sidecar caption file
    meta: dict | None = None  # written as the sample's `json` field


# ---------------------------------------------------------------- listing the input

def detect_kind(path: str) -> str:
    """"manifest" for a .csv/.tsv/.jsonl file; "classes" for a folder holding only subfolders and no
    .txt captions anywhere (a tree of sidecar-captioned images is still a "folder"); else "folder"."""
    if os.path.isfile(path):
        if path.lower().endswith(MANIFEST_EXTS):
            return "manifest"
        raise ValueError(f"{path} is a file but not a manifest (one of {', '.join(MANIFEST_EXTS)})")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input {path} does not exist")
    children = [c for c in os.listdir(path) if not c.startswith(".")]
    only_dirs = bool(children) and all(os.path.isdir(os.path.join(path, c)) for c in children)
    has_captions = any(f.lower().endswith(".txt") for f in walk_files(path))
    return "classes" if only_dirs and not has_captions else "folder"


def walk_files(root: str) -> Iterator[str]:
    """Paths under `root`, relative to it, in sorted order at every level; hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: os.walk descends in this order
        rel = os.path.relpath(folder, root)
        for f in sorted(files):
            if not f.startswith("."):
                yield f if rel == "." else os.path.join(rel, f)


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_folder_items(root: str) -> list[Item]:
    """Every image under `root` with the `.txt` file of the same stem as its caption."""
    return [Item(source=rel, image=os.path.join(root, rel),
                 caption_file=os.path.join(root, os.path.splitext(rel)[0] + ".txt"))
            for rel in walk_files(root) if is_image_file(rel)]


def list_class_items(root: str) -> tuple[list[Item], list[str]]:
    """Images of `root/<class_name>/...`, captioned by their class name; also the sorted class names."""
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    items = []
    for index, name in enumerate(classes):
        caption = name.replace("_", " ").strip()
        meta = {"label": name, "label_index": index}
        for rel in walk_files(os.path.join(root, name)):
            if is_image_file(rel):
                items.append(Item(source=os.path.join(name, rel), image=os.path.join(root, name, rel),
                                  caption=caption, meta=meta))
    return items, classes


def read_manifest_rows(path: str, image_key: str, caption_key: str) -> Iterator[tuple[int, dict | None]]:
    """(line number, row) for each row of a CSV/TSV/JSONL manifest; row is None for an unparseable JSONL line.
    Fails at once, listing the columns there are, when the first row lacks either column."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports often start with a BOM
        if path.lower().endswith(".jsonl"):
            rows = _jsonl_rows(f)
        else:
            reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            rows = ((reader.line_num, row) for row in reader)
        checked = False
        for line, row in rows:
            if row is not None and not checked:
                missing = [k for k in (image_key, caption_key) if k not in row]
                if missing:
                    raise ValueError(f"manifest {path} has no column {' or '.join(map(repr, missing))}; it has "
                                     f"{sorted(row)}. Name them with --image_key= and --caption_key=")
                checked = True
            yield line, row


def _jsonl_rows(f) -> Iterator[tuple[int, dict | None]]:
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        yield line_no, row if isinstance(row, dict) else None


def list_manifest_items(path: str, image_key: str, caption_key: str) -> tuple[list[Item], list[tuple[str, SampleError]]]:
    """Items of a manifest, plus (source, error) for rows that name no image or a non-text caption."""
    base = os.path.dirname(os.path.abspath(path))
    items, bad = [], []
    for line, row in read_manifest_rows(path, image_key, caption_key):
        where = f"{os.path.basename(path)}:{line}"
        image = row.get(image_key) if row is not None else None
        caption = row.get(caption_key) if row is not None else None
        if not isinstance(image, str) or not image.strip():
            bad.append((where, SampleError("bad manifest row", "not a JSON object" if row is None else f"no {image_key}")))
        elif caption is not None and not isinstance(caption, str):
            bad.append((where, SampleError("bad manifest row", f"{caption_key} is a {type(caption).__name__}, not text")))
        else:
            image = image.strip()
            local = not image.startswith(("http://", "https://"))
            items.append(Item(source=image, image=os.path.join(base, image) if local else image, caption=caption or ""))
    return items, bad


# ---------------------------------------------------------------- one item -> one sample

def read_caption(item: Item) -> str:
    """The item's caption, stripped; SampleError when there is none."""
    text = item.caption
    if text is None:
        try:
            with open(item.caption_file, encoding="utf-8-sig") as f:
                text = f.read()
        except FileNotFoundError:
            raise SampleError("no caption", f"no {os.path.basename(item.caption_file)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError("unreadable caption", f"{type(e).__name__}: {e}") from None
    text = text.strip()
    if not text:
        raise SampleError("empty caption")
    return text


def read_image_bytes(location: str) -> bytes:
    """The bytes of a local file or an http(s) URL."""
    if location.startswith(("http://", "https://")):
        try:
            request = urllib.request.Request(location, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return response.read()
        except Exception as e:  # noqa: BLE001 - refused, timed out, 404, truncated: all one failed download
            raise SampleError("download failed", f"{type(e).__name__}: {e}") from None
    try:
        with open(location, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SampleError("missing file", location) from None
    except OSError as e:
        raise SampleError("unreadable image", f"{type(e).__name__}: {e}") from None


def resized_size(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled down to `image_size`, aspect kept; unchanged when it is already
    no larger (we never upscale) or when image_size is 0."""
    w, h = size
    short = min(w, h)
    if image_size <= 0 or short <= image_size:
        return w, h
    scale = image_size / short
    return (image_size, max(1, round(h * scale))) if w == short else (max(1, round(w * scale)), image_size)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparent pixels become white, not whatever colour hides under the alpha."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def encode_image(data: bytes, image_size: int) -> bytes:
    """Image bytes in any format PIL reads -> RGB JPEG bytes, shorter side at most `image_size` (0: any)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft(None, resized_size(im.size, image_size))  # JPEG: decode at 1/2..1/8 scale, far faster for photos
            im = to_rgb(ImageOps.exif_transpose(im))  # phone photos store their rotation in EXIF
            target = resized_size(im.size, image_size)
            if target != im.size:
                im = im.resize(target, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=JPEG_QUALITY)
            return out.getvalue()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt or odd files; each is one bad item
        raise SampleError("unreadable image", f"{type(e).__name__}: {e}") from None


def build_sample(item: Item, image_size: int) -> dict[str, bytes]:
    """An item -> {"jpg", "txt"[, "json"]} bytes. The caption is read first: no download for an uncaptioned image."""
    caption = read_caption(item)
    sample = {"jpg": encode_image(read_image_bytes(item.image), image_size), "txt": caption.encode("utf-8")}
    if item.meta is not None:
        sample["json"] = json.dumps(item.meta, sort_keys=True).encode("utf-8")
    return sample


def try_build_sample(item: Item, image_size: int) -> tuple[Item, dict | None, SampleError | None]:
    try:
        return item, build_sample(item, image_size), None
    except SampleError as e:
        return item, None, e


def map_ordered(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
    """`fn` over `items` on a thread pool (PIL and sockets release the GIL), results in input order so the
    shards are the same however the threads finish; at most 4 * num_workers items in flight."""
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------- writing

def record_failure(stats: dict, source: str, error: SampleError) -> None:
    stats["failed"] += 1
    stats["failures"][error.reason] = stats["failures"].get(error.reason, 0) + 1
    if len(stats["examples"]) < MAX_EXAMPLES:
        stats["examples"].append({"source": source, "reason": error.reason, "detail": error.detail})


def remove_stale_shards(output: str) -> None:
    """Delete shards an earlier run wrote here: a loader pointed at the folder would read them too."""
    for name in os.listdir(output):
        if SHARD_NAME.fullmatch(name):
            os.remove(os.path.join(output, name))


def list_items(input: str, kind: str, image_key: str, caption_key: str) -> tuple[list[Item], list, dict]:
    """(items, (source, error) of unusable manifest rows, extra stats) for a resolved `kind`."""
    if kind == "folder":
        return list_folder_items(input), [], {}
    if kind == "classes":
        items, classes = list_class_items(input)
        return items, [], {"classes": classes}
    if kind == "manifest":
        items, bad = list_manifest_items(input, image_key, caption_key)
        return items, bad, {}
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")


def write_shards(input: str, output: str, kind: str = "auto", image_size: int = 256, max_count: int = 10000,
                 max_size_mb: float = 1000.0, image_key: str = "image", caption_key: str = "caption",
                 shuffle: bool = True, num_workers: int = 8) -> dict:
    """Write the image-caption data at `input` as `<output>/shard-NNNNNN.tar` plus `<output>/stats.json`.

    A shard is closed at `max_count` samples or once it holds `max_size_mb` (10^6 bytes) of payload.
    Returns the stats: {"input", "kind", "written", "failed", "failures": {reason: count},
    "examples": [{"source", "reason", "detail"}] (the first 20), "shards": [file names]} (+ "classes").
    """
    kind = detect_kind(input) if kind == "auto" else kind
    items, bad_rows, extra = list_items(input, kind, image_key, caption_key)
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(items)
    os.makedirs(output, exist_ok=True)
    remove_stale_shards(output)
    stats = {"input": input, "kind": kind, "written": 0, "failed": 0, "failures": {}, "examples": [], "shards": [],
             **extra}
    for source, error in bad_rows:
        record_failure(stats, source, error)

    shards: list[str] = []
    writer = wds.ShardWriter(os.path.join(output, SHARD_PATTERN), maxcount=max_count, maxsize=max_size_mb * 1e6,
                             post=lambda path: shards.append(os.path.basename(path)), verbose=0,
                             mtime=0.0)  # a fixed mtime: re-runs give byte-identical tars
    with writer:
        results = map_ordered(lambda item: try_build_sample(item, image_size), items, num_workers)
        for item, sample, error in tqdm(results, total=len(items), desc=f"writing {kind}", unit="img"):
            if error is not None:
                record_failure(stats, item.source, error)
                continue
            writer.write({"__key__": f"{stats['written']:09d}", **sample})
            stats["written"] += 1
    if stats["written"] == 0:  # ShardWriter opens its first shard up front; an empty one would only mislead
        os.remove(os.path.join(output, SHARD_PATTERN % 0))
        shards.clear()
    stats["shards"] = shards
    with open(os.path.join(output, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.write_shards", allow_abbrev=False,
                                description="Write image-caption data as WebDataset shards for mm.")
    p.add_argument("--input", required=True, help="a folder, or a .csv/.tsv/.jsonl manifest")
    p.add_argument("--output", required=True, help="folder for shard-NNNNNN.tar and stats.json")
    p.add_argument("--kind", default="auto", choices=KINDS, help="what --input is (default: auto-detect)")
    p.add_argument("--image_size", type=int, default=256, help="shorter side in pixels, never upscaled; 0 keeps size")
    p.add_argument("--max_count", type=int, default=10000, help="samples per shard at most")
    p.add_argument("--max_size_mb", type=float, default=1000.0, help="payload per shard at most, in 10^6 bytes")
    p.add_argument("--image_key", default="image", help="manifest column with the image path or URL")
    p.add_argument("--caption_key", default="caption", help="manifest column with the caption")
    p.add_argument("--shuffle", type=parse_bool, default=True, help="shuffle items (fixed seed) before writing")
    p.add_argument("--num_workers", type=int, default=8, help="threads reading, downloading and resizing")
    return p


def main(argv: list[str] | None = None) -> None:
    """The command line; also the `mm-write-shards` entry point (so it returns None: exit status 0)."""
    args = build_parser().parse_args(argv)
    try:
        stats = write_shards(**vars(args))
    except (ValueError, OSError) as e:  # bad input path or manifest columns: a message, not a traceback
        sys.exit(f"write_shards: {e}")
    print(f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {args.output}; "
          f"{stats['failed']} failed: {stats['failures']}")


if __name__ == "__main__":
    main()
