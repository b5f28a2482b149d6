"""Reading and writing for the curation tools: raw samples in, byte-identical copies of the kept ones out.

    report = Report("read")
    with ShardWriter("curated/") as writer:
        for sample in iter_samples("raw/shard-{000000..000009}.tar", report):
            writer.write(sample)

Samples are raw WebDataset samples as `mm.shards.read_samples` yields them: {"__key__", "__url__", and one
bytes value per field ("jpg", "txt", "flac", "json", ...)}. A step decodes only what it needs (with the
helpers here) and passes the sample on unchanged, so an output shard holds the input's bytes.

The output folder is guarded (`prepare_output`): never one that holds an input shard, never one holding
files an earlier run of these tools did not write. Each run lists what it wrote in report.json; a re-run
replaces exactly those files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image

from mm.decoders import TEXT_KEYS  # the fields a caption or transcript is read from, as the recipes read them
from mm.media import AUDIO_KEYS, DEFAULT_MAX_PIXELS, IMAGE_KEYS, open_image
from mm.shards import COUNTS, expand_shard_spec, is_manifest, is_remote, read_samples

from data_tools.curate.report import Report

REPORT_NAME = "report.json"
JSON_TEXT_KEYS = ("text", "caption")  # else these keys of the sample's json
TAR_MTIME = 0  # every member's mtime: fixed, so the same samples always make the same shard bytes
# What a run leaves behind if it is killed: ShardWriter's temp shards and run_chain's temp folders.
OWN_TEMP = re.compile(r"\..+\.tar\.\d+\.tmp|\.tmp-curate-.+")


# ---------------------------------------------------------------- reading

def list_shard_urls(spec: str) -> list[str]:
    """The shard URLs of a spec (paths, folders, brace patterns, http(s)://, pipe:, `::`-joined sources).
    Raises ShardSpecError (a ValueError) for missing shards, ValueError for JSONL manifests."""
    urls = [u for source in expand_shard_spec(spec) for u in source.urls]
    manifests = [u for u in urls if is_manifest(u)]
    if manifests:
        raise ValueError(f"{manifests[0]}: the curation tools read .tar shards, not JSONL manifests (their paths are "
                         "relative to the manifest); write shards first with data_tools.write_shards or "
                         "write_asr_shards")
    return urls


def iter_samples(spec: str, report: Report) -> Iterator[dict]:
    """Raw samples of every shard of `spec`, in order. Each sample is `seen` and `keep`-ed in `report`; a shard
    that cannot be opened or ends early counts as one `corrupt` item (the samples read before the fault pass on)."""
    for url in list_shard_urls(spec):
        counts = dict.fromkeys(COUNTS, 0)
        n = 0
        for sample in read_samples([url], counts):
            n += 1
            report.seen()
            report.keep(sample)
            yield sample
        if counts["bad_shards"]:
            report.seen()
            what = "could not be opened or read" if n == 0 else f"ends early or is corrupt after {n} samples"
            report.corrupt(url, f"shard {what}")


def _text(value: bytes | str, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"field {field!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def sample_json(sample: dict) -> dict | None:
    """The sample's `json` field as a dict, None when there is none; ValueError when it is not a JSON object."""
    if "json" not in sample:
        return None
    try:
        meta = json.loads(_text(sample["json"], "json"))
    except json.JSONDecodeError as e:
        raise ValueError(f"field 'json' is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"field 'json' is a JSON {type(meta).__name__}, not an object")
    return meta


def sample_text(sample: dict) -> str | None:
    """The caption or transcript: a txt/caption/text field, else the json's "text" or "caption"; None if absent.
    ValueError when the text is not UTF-8 or the json is malformed."""
    for key in TEXT_KEYS:
        if key in sample:
            return _text(sample[key], key)
    meta = sample_json(sample)
    for key in JSON_TEXT_KEYS:
        if meta is not None and isinstance(meta.get(key), str):
            return meta[key]
    return None


def _first_field(sample: dict, keys: tuple[str, ...]) -> tuple[str, bytes] | None:
    for key in keys:
        if key in sample:
            return key, sample[key]
    return None


def sample_image_bytes(sample: dict) -> tuple[str, bytes] | None:
    """(field, bytes) of the sample's image (jpg, png, webp, ...), or None."""
    return _first_field(sample, IMAGE_KEYS)


def sample_audio_bytes(sample: dict) -> tuple[str, bytes] | None:
    """(field, bytes) of the sample's audio (flac, wav, mp3, ...), or None."""
    return _first_field(sample, AUDIO_KEYS)


def decode_image(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The sample's image, decoded, RGB. Raises (a ValueError) when there is none or it is corrupt; a
    decompression bomb is refused from its header (mm.media.open_image)."""
    found = sample_image_bytes(sample)
    if found is None:
        raise ValueError(f"no image field ({'/'.join(IMAGE_KEYS)}); has {sample_fields(sample)}")
    field, data = found
    return open_image(bytes(data), max_pixels=max_pixels, name=f"{sample.get('__key__')}.{field}")


def sample_fields(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def sample_nbytes(sample: dict) -> int:
    """The payload a sample adds to a shard: the sum of its fields' sizes (tar headers not counted)."""
    return sum(len(v) for k, v in sample.items() if not k.startswith("_"))


# ---------------------------------------------------------------- writing

class ShardWriter:
    """Write samples to `<output_dir>/<prefix>-000000.tar`, ... A shard is closed at `max_count` samples or once it
    holds `max_bytes` of payload. Shards are written under hidden temp names and renamed when the writer closes
    without an error; on an error the temps are removed and no earlier file is touched.

    `paths` lists the final shard paths (they exist once the writer has closed). `next_shard()` closes the
    current shard early (resharding to an exact count uses it). Fields are written as the bytes they are.
    A sample whose key equals the one just written starts a new shard: side by side in one tar, a reader would
    merge the two into one broken sample (sources numbered alike can meet so at a shard boundary)."""

    def __init__(self, output_dir: str | Path, max_count: int = 10000, max_bytes: float = 1e9, prefix: str = "shard"):
        if max_count < 1 or max_bytes <= 0:
            raise ValueError(f"a shard needs max_count >= 1 and max_bytes > 0 (got {max_count}, {max_bytes})")
        self.output_dir = Path(output_dir)
        self.max_count, self.max_bytes, self.prefix = max_count, max_bytes, prefix
        self.paths: list[Path] = []
        self._temps: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._count = self._bytes = 0
        self._last_key: str | None = None  # the key written last into the open shard
        self.n_written = 0

    def __enter__(self) -> ShardWriter:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: dict) -> None:
        if "__key__" not in sample:
            raise ValueError(f"a sample needs a __key__; this one has {sample_fields(sample)}")
        if self._tar is not None and sample["__key__"] == self._last_key:
            self.next_shard()
        if self._tar is None:
            self._open_next()
        self._tar.write(sample)
        self._last_key = sample["__key__"]
        self._tar.tarstream.members = []  # tarfile keeps every TarInfo written otherwise: ~1 KB a sample
        self._count += 1
        self._bytes += sample_nbytes(sample)
        self.n_written += 1
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self.next_shard()

    def next_shard(self) -> None:
        """Close the current shard (if it holds anything); the next sample starts a new one."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def _open_next(self) -> None:
        final = self.output_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        temp = self.output_dir / f".{final.name}.{os.getpid()}.tmp"
        self.paths.append(final)
        self._temps.append(temp)
        # encoder=False: bytes go in as they are (webdataset would otherwise gzip a field named "*.gz" again)
        self._tar = wds.TarWriter(str(temp), encoder=False, mtime=TAR_MTIME)
        self._count = self._bytes = 0

    def close(self) -> None:
        self.next_shard()
        for temp, final in zip(self._temps, self.paths):
            os.replace(temp, final)
        self._temps = []

    def abort(self) -> None:
        try:
            self.next_shard()
        finally:
            for temp in self._temps:
                temp.unlink(missing_ok=True)
            self._temps, self.paths = [], []


# ---------------------------------------------------------------- the output folder

def read_own_files(output_dir: Path) -> list[str]:
    """The file names an earlier curation run wrote into `output_dir`, from its report.json ([] when none)."""
    path = output_dir / REPORT_NAME
    if not path.exists():
        return []
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        files = None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path} is not a report.json a curation run wrote (no list of files): this folder is not "
                         "ours to write into; choose another --output, or remove it")
    return files


def local_input_inside(folder: str | Path, urls: list[str]) -> str | None:
    """The first local shard of `urls` that is `folder` or lies inside it (None when there is none): writing a
    report or shards there could replace the input."""
    real = Path(folder).resolve()
    for url in urls:
        path = Path(url).resolve()
        if not is_remote(url) and (path == real or real in path.parents):
            return url
    return None


def prepare_output(output_dir: str | Path, input_spec: str, overwrite: bool = False) -> list[str]:
    """Check that `output_dir` may be written, and create it. Returns the names of the files this run replaces
    (an earlier run's shards and temps; with overwrite, also any other .tar file there): `remove_stale` them once
    the new shards are in place. ValueError, changing nothing, when the folder holds (or is inside) an input shard,
    or holds files no curation run wrote and `overwrite` is false."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    url = local_input_inside(out, list_shard_urls(input_spec))
    if url is not None:
        raise ValueError(f"output folder {out} holds input shard {url}: the input is never changed; write to "
                         "another folder")
    if not out.exists():
        out.mkdir(parents=True)
        return []
    own = set(read_own_files(out))
    present = sorted(p.name for p in out.iterdir())
    ours = [n for n in present if n in own or OWN_TEMP.fullmatch(n)]
    foreign = [n for n in present if n not in ours and n != REPORT_NAME]
    if foreign and not overwrite:
        raise ValueError(f"output folder {out} holds {len(foreign)} files no curation run wrote (e.g. {foreign[:3]}); "
                         "choose an empty folder, or pass --overwrite=true to replace the .tar files there")
    return ours + ([n for n in foreign if n.endswith(".tar")] if overwrite else [])


def remove_stale(output_dir: str | Path, stale: list[str], written: list[Path]) -> None:
    """Remove the files `prepare_output` named, except those this run has just written over."""
    keep = {p.name for p in written}
    for name in stale:
        path = Path(output_dir) / name
        if name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
