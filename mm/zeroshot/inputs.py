"""What users hand the zero-shot classifier besides images (those are `mm.media`'s): labels and templates.

Every failure here is a `ValueError` subclass with a message a person can act on, so the CLI,
the HTTP server and the demo can turn it into an exit code, a 4xx or a UI message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# The image helpers are shared with the loader and the shard writer; re-exported here for the zero-shot API.
from mm.media import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageTooLarge, NotAnImage, check_pixels,  # noqa: F401
                      find_images, open_image)


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
