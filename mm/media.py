"""Opening what users and shards hand us, made safe: images (and, below, audio), with their size limits.

One list of image file types for the whole kit: the shard writer picks files by it, the loader reads
sample fields by it, the zero-shot CLI finds images by it. Every failure is a `ValueError` subclass
with a message a person can act on, so a CLI, an HTTP server, a demo or the loader's bad-sample
counter can turn it into an exit code, a 4xx, a UI message or a skipped sample.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

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
