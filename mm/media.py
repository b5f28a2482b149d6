"""Opening what users and shards hand us, made safe: images, audio, and the references (paths and URLs)
that manifests and chat messages point at, each with its size limit.

One list of image file types (and one of audio types) for the whole kit: the shard writer picks files
by it, the loader reads sample fields by it, the zero-shot CLI finds images by it. Every failure is a
`ValueError` subclass (or `FileNotFoundError` for a missing file) with a message a person can act on,
so a CLI, an HTTP server, a demo or the loader's bad-sample counter can turn it into an exit code, a
4xx, a UI message or a skipped sample.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import soundfile
import soxr
from PIL import Image, UnidentifiedImageError

from mm.batching import SampleTooLong  # what the loader counts as too_long rather than bad

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # the same list, as WebDataset sample fields
# 50 megapixels (~150 MB once decoded to RGB): above any ordinary photo, far below what a
# few-KB "decompression bomb" PNG can declare.
DEFAULT_MAX_PIXELS = 50_000_000


class NotAnImage(ValueError):
    """The bytes or file are not an image PIL can decode."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed (a decompression bomb, or just too big)."""


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """A decoded RGB image from a path, raw bytes or a PIL image.

    The pixel count is checked from the header, before any pixel data is decompressed, so a
    tiny file declaring 100k x 100k pixels costs nothing. PIL's own bomb guard (its warning
    made an error) backs this up. `name` is how messages call the image (default: its path,
    or "uploaded bytes"); a server passes its own so that no temp path reaches the user.
    """
    if isinstance(source, Image.Image):
        check_pixels(source.size, max_pixels, name or "image")
        return source.convert("RGB")
    if name is None:
        name = "uploaded bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:  # reads the header only
                check_pixels(img.size, max_pixels, name)
                return img.convert("RGB")  # decodes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{name}: image too large ({_without_path(e, source)})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such image file") from None
    except UnidentifiedImageError:
        raise NotAnImage(f"{name}: not an image (formats: {', '.join(IMAGE_EXTENSIONS)})") from None
    except (ImageTooLarge, MemoryError):
        raise
    except Exception as e:  # PIL's decoders raise assorted errors (OSError, ValueError, ...) on corrupt data
        raise NotAnImage(f"{name}: could not decode image ({type(e).__name__}: {_without_path(e, source)})") from None


def _without_path(error: Exception, source) -> str:
    """PIL's message with the file's path taken out (it may be a server's temp file)."""
    text = str(error)
    return text.replace(str(source), "the file") if isinstance(source, (str, Path)) else text


def check_pixels(size: tuple[int, int], max_pixels: int, name: str = "image") -> None:
    """Raise ImageTooLarge when width x height exceeds `max_pixels`."""
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, plus those found recursively (sorted) in named folders."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


# ---------------------------------------------------------------- audio

SAMPLE_RATE = 16000  # Hz, what Whisper-style models hear
# All read by soundfile: libsndfile >= 1.1 (bundled in soundfile's wheels) reads MP3, and Ogg Opus.
# m4a/aac are not here: libsndfile cannot read them, and we do not depend on ffmpeg.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3")
AUDIO_KEYS = tuple(e.lstrip(".") for e in AUDIO_EXTENSIONS)  # the same list, as WebDataset sample fields
# Ten minutes: far above a training clip (Whisper hears 30 s), and ~115 MB once decoded at 48 kHz,
# in line with the image limit's ~150 MB.
DEFAULT_MAX_SECONDS = 600.0
# The highest rate of ordinary audio (DXD). A header declaring more is refused, so max_seconds also
# bounds the memory that decoding takes.
MAX_SOURCE_RATE = 384_000
_READ_BLOCK = 65536  # frames decoded at a time, down-mixed as they come


class NotAudio(ValueError):
    """The bytes or file are not audio soundfile can decode."""


class EmptyAudio(NotAudio):
    """The file is empty, or a valid header declares no samples."""


class AudioTooLong(SampleTooLong):
    """The audio lasts longer than allowed. A SampleTooLong (a ValueError): the loader counts it as too_long."""


def load_audio(source: str | Path | bytes, sample_rate: int = SAMPLE_RATE,
               max_seconds: float | None = DEFAULT_MAX_SECONDS, name: str | None = None) -> np.ndarray:
    """Mono float32 samples (about -1..1) at `sample_rate` Hz, shape [T], from a path or raw bytes.

    The duration is checked from the header (frames / rate) before any sample is decoded, so a
    10-hour file costs a header read. Channels are averaged block by block as they are decoded, so
    a many-channel file never sits in memory whole; the result is then resampled with soxr (HQ).
    `name` is how messages call the audio (default: its path, or "audio bytes"), as in open_image.
    """
    if name is None:
        name = "audio bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EmptyAudio(f"{name}: empty (0 bytes)")
        fp = io.BytesIO(source)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise FileNotFoundError(f"{name}: no such audio file")
        if fp.stat().st_size == 0:
            raise EmptyAudio(f"{name}: empty file (0 bytes)")
    try:
        f = soundfile.SoundFile(fp)  # reads the header only
    except soundfile.LibsndfileError as e:  # its str() holds the file's repr (a path or a BytesIO): keep it out
        raise NotAudio(f"{name}: not audio soundfile can decode ({e.error_string.rstrip('.')}; "
                       f"formats: {', '.join(AUDIO_EXTENSIONS)})") from None
    except Exception as e:  # soundfile raises assorted errors (RuntimeError, TypeError, ...) on odd input
        raise NotAudio(f"{name}: could not open audio ({type(e).__name__})") from None
    with f:
        check_audio_header(f.frames, f.samplerate, max_seconds, name)
        try:
            mono = _read_mono(f)
        except MemoryError:
            raise
        except Exception as e:  # a valid header over missing or corrupt data
            reason = e.error_string.rstrip(".") if isinstance(e, soundfile.LibsndfileError) else type(e).__name__
            raise NotAudio(f"{name}: could not decode audio, truncated or corrupt ({reason})") from None
        source_rate = f.samplerate
    if mono.size == 0:
        raise EmptyAudio(f"{name}: no audio samples")
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_audio_header(frames: int, sample_rate: int, max_seconds: float | None, name: str = "audio") -> None:
    """Raise EmptyAudio, NotAudio or AudioTooLong from what a header declares: frames at sample_rate Hz."""
    if frames <= 0:
        raise EmptyAudio(f"{name}: no audio samples")
    if not 0 < sample_rate <= MAX_SOURCE_RATE:
        raise NotAudio(f"{name}: sample rate {sample_rate} Hz is outside 1..{MAX_SOURCE_RATE}")
    seconds = frames / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLong(f"{name}: {seconds:.1f} s exceeds the limit of {max_seconds:g} s")


def _read_mono(f: soundfile.SoundFile) -> np.ndarray:
    """All of an open file's frames, channels averaged block by block: float32 [frames]."""
    out = np.empty(f.frames, dtype=np.float32)  # the header's count: read() never goes past it
    n = 0
    for block in f.blocks(blocksize=_READ_BLOCK, dtype="float32", always_2d=True):  # [frames, channels]
        out[n:n + len(block)] = block.mean(axis=1)
        n += len(block)
    return out[:n]


# ---------------------------------------------------------------- references (paths and URLs)

class UnreadableRef(ValueError):
    """A reference (path, file:, data: or http(s) URL) that cannot be read: malformed, bad base64, HTTP error."""


class RefTooLarge(UnreadableRef):
    """What a reference points at is larger than allowed."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:\\..." is a Windows path


def read_ref(ref: str, root: str | Path | None, max_bytes: int, timeout: float = 30.0) -> bytes:
    """The bytes a manifest or a chat message points at, at most `max_bytes` of them.

    `ref` is a local path (absolute, or relative to `root`; with no root a relative path is refused),
    a file:// URL, a data: URL (base64 or percent-encoded), or an http(s):// URL, fetched with
    `timeout` seconds per network operation. Oversize is refused from the file size, the data:
    URL's length or the Content-Length header when they tell, and otherwise after max_bytes + 1 bytes.
    """
    scheme = _SCHEME.match(ref)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme == "data":
        return _read_data_url(ref, max_bytes)
    if scheme in ("http", "https"):
        return _read_http(ref, max_bytes, timeout)
    if scheme == "file":
        parts = urllib.parse.urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise UnreadableRef(f"{ref}: a file:// URL on another host ({parts.netloc}) cannot be read")
        return _read_file(Path(urllib.request.url2pathname(parts.path)), ref, max_bytes)
    if scheme is not None and "://" in ref:
        raise UnreadableRef(f"{short_ref(ref)}: unsupported URL scheme '{scheme}' "
                            "(accepted: a path, file://, data:, http(s)://)")
    path = Path(ref)
    if not path.is_absolute():
        if root is None:  # rather than reading from wherever the process happens to run
            raise UnreadableRef(f"{short_ref(ref)}: a relative path, and no folder to resolve it against")
        path = Path(root) / path
    return _read_file(path, ref, max_bytes)


def short_ref(ref: str, limit: int = 80) -> str:
    """`ref` cut for a message: a data: URL may be megabytes long."""
    return ref if len(ref) <= limit else ref[:limit] + f"... ({len(ref):,} chars)"


def _read_file(path: Path, ref: str, max_bytes: int) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{ref}: no such file" + ("" if str(path) == ref else f" ({path})"))
    size = path.stat().st_size
    if size > max_bytes:
        raise RefTooLarge(f"{ref}: {size:,} bytes exceeds the limit of {max_bytes:,}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # the file may have grown since stat()
    if len(data) > max_bytes:
        raise RefTooLarge(f"{ref}: more than {max_bytes:,} bytes")
    return data


def _read_data_url(ref: str, max_bytes: int) -> bytes:
    """data:[<media type>][;base64],<data> (RFC 2397)."""
    header, comma, payload = ref[len("data:"):].partition(",")
    if not comma:
        raise UnreadableRef(f"{short_ref(ref)}: malformed data: URL (no ',' before the data)")
    if header.lower().endswith(";base64"):
        payload = "".join(payload.split())  # some writers wrap base64 lines
        if len(payload) // 4 * 3 > max_bytes + 2:  # decoded size, known before decoding
            raise RefTooLarge(f"{short_ref(ref)}: about {len(payload) // 4 * 3:,} bytes "
                              f"exceeds the limit of {max_bytes:,}")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise UnreadableRef(f"{short_ref(ref)}: bad base64 in data: URL ({e})") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise RefTooLarge(f"{short_ref(ref)}: {len(data):,} bytes exceeds the limit of {max_bytes:,}")
    return data


def _read_http(url: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mm"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RefTooLarge(f"{url}: {int(declared):,} bytes (Content-Length) exceeds the limit of {max_bytes:,}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        e.close()
        raise UnreadableRef(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise UnreadableRef(f"{url}: could not fetch ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncated bodies
        raise UnreadableRef(f"{url}: could not fetch ({type(e).__name__}: {e})") from None
    if len(data) > max_bytes:
        raise RefTooLarge(f"{url}: more than {max_bytes:,} bytes")
    return data
