"""What users hand the zero-shot classifier besides images (those are `mm.media`'s): labels and templates.

Every failure here is a `ValueError` subclass with a message a person can act on, so the CLI,
the HTTP server and the demo can turn it into an exit code, a 4xx or a UI message.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable, Sequence

# The image helpers are shared with the loader and the shard writer; re-exported here for the zero-shot API.
from mm.media import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageTooLarge, NotAnImage, check_pixels,  # noqa: F401
                      find_images, open_image)

# A prompt is a template with the label put in. CLIP's text tower keeps 77 tokens (a few hundred
# characters), so this only bounds the tokenizer's work on what a caller sends, never a real prompt.
MAX_PROMPT_CHARS = 1000


def parse_labels(text: str | Iterable[str]) -> list[str]:
    """Labels from a JSON list ('["cat", "dog"]'), comma- or newline-separated text, or a list.

    Whitespace is stripped, empty entries dropped and repeats removed (first one kept), so
    "cat, dog, cat," gives ["cat", "dog"].
    """
    if isinstance(text, str):
        stripped = text.strip()
        items = json_strings(stripped, "labels") if stripped.startswith("[") else stripped.replace("\n", ",").split(",")
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


def parse_templates(text: str) -> list[str]:
    """Templates from a JSON list ('["a photo of a {}.", "{}"]') or text with one template per line.

    Never split on commas: "a photo of a {}, in the wild" is one template. Whitespace is
    stripped and blank lines dropped; `check_templates` says whether what is left is usable.
    """
    stripped = text.strip()
    items = json_strings(stripped, "templates") if stripped.startswith("[") else stripped.splitlines()
    return [x.strip() for x in items if x.strip()]


def json_strings(text: str, what: str) -> list[str]:
    """A JSON list of strings, or a ValueError saying what `what` (labels, templates) should look like."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} look like a JSON list but do not parse: {e}") from None
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{what} as JSON must be a list of strings")
    return items


def check_templates(templates: Sequence[str], labels: Sequence[str] = ()) -> None:
    """Raise ValueError unless every template has exactly one bare '{}' where the label goes, and every
    prompt (template x label) stays within MAX_PROMPT_CHARS.

    Templates are filled in with str.format, so anything beyond '{}' would be obeyed: a second field
    ('{} {x}', '{0}') fails, an attribute ('{.__class__}') reads the label's internals, and a format
    spec ('{:>100000000}') turns 20 characters into a 100 MB prompt. '{{' and '}}' are literal braces.
    """
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, not one string ({templates!r})")
    if not templates:
        raise ValueError("no templates given: pass at least one, with '{}' where the label goes")
    for template in templates:
        check_template(template)
    # Safe to format now: a bare {} adds exactly the label's characters.
    longest = max(len(t.format("")) for t in templates) + max((len(x) for x in labels), default=0)
    if longest > MAX_PROMPT_CHARS:
        raise ValueError(f"prompts (template with the label put in) of up to {longest:,} characters: "
                         f"the limit is {MAX_PROMPT_CHARS:,}")


def check_template(template: str) -> None:
    """Raise ValueError unless `template` is a string with exactly one bare '{}' (see check_templates)."""
    if not isinstance(template, str):
        raise ValueError(f"templates must be strings, got {template!r}")
    hint = "it needs exactly one '{}' where the label goes; write '{{' and '}}' for literal braces"
    try:  # parse is lazy: iterating it is what raises on a malformed template
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is malformed ({e}): {hint}") from None
    if len(fields) != 1:
        raise ValueError(f"template {template!r} has {len(fields)} placeholders: {hint}")
    name, spec, conversion = fields[0]
    if name or spec or conversion:
        raise ValueError(f"template {template!r}: the placeholder must be a bare '{{}}', without a field name, "
                         f"index, attribute, format spec or conversion")


def read_lines(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a text file (labels or templates files); '#' starts a comment line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
