"""What users hand the zero-shot classifier, made safe: images (paths, bytes, PIL, tensors) and label lists.

Every failure here is a `ValueError` subclass with a message a person can act on, so the CLI,
the HTTP server and the demo can turn it into an exit code, a 4xx or a UI message.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# 50 megapixels (~150 MB once decoded to RGB): above any ordinary photo, far below what a
# few-KB "decompression bomb" PNG can declare.
DEFAULT_MAX_PIXELS = 50_000_000


class NotAnImage(ValueError):
    """The bytes or file are not an image PIL can decode."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed (a decompression bomb, or just too big)."""


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A decoded RGB image from a path, raw bytes or a PIL image.

    The pixel count is checked from the header, before any pixel data is decompressed, so a
    tiny file declaring 100k x 100k pixels costs nothing. PIL's own bomb guard (its warning
    made an error) backs this up.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "uploaded bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:  # reads the header only
                check_pixels(img.size, max_pixels, name)
                return img.convert("RGB")  # decodes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{name}: image too large ({e})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such image file") from None
    except UnidentifiedImageError:
        raise NotAnImage(f"{name}: not an image (formats: {', '.join(IMAGE_EXTENSIONS)})") from None
    except (ImageTooLarge, MemoryError):
        raise
    except Exception as e:  # PIL's decoders raise assorted errors (OSError, ValueError, ...) on corrupt data
        raise NotAnImage(f"{name}: could not decode image ({type(e).__name__}: {e})") from None


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


def parse_labels(text: str | Iterable[str]) -> list[str]:
    """Labels from a JSON list ('["cat", "dog"]'), comma- or newline-separated text, or a list.

    Whitespace is stripped, empty entries dropped and repeats removed (first one kept), so
    "cat, dog, cat," gives ["cat", "dog"].
    """
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"labels look like a JSON list but do not parse: {e}") from None
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError("labels as JSON must be a list of strings")
        else:
            items = stripped.replace("\n", ",").split(",")
    else:
        items = list(text)
    labels = [x.strip() for x in items if isinstance(x, str) and x.strip()]
    return list(dict.fromkeys(labels))


def labels_from_text(text: str, max_labels: int) -> list[str]:
    """`parse_labels` for what a person typed or sent: ValueError when there are none or more than `max_labels`."""
    labels = parse_labels(text or "")
    if not labels:
        raise ValueError('no labels. Type at least one label, separated by commas ("cat, dog"), '
                         'or send a JSON list ["cat", "dog"].')
    if len(labels) > max_labels:
        raise ValueError(f"too many labels: {len(labels)} (at most {max_labels})")
    return labels


def read_lines(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a text file (labels or templates files); '#' starts a comment line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
