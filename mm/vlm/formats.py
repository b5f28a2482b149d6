"""LLaVA and ShareGPT chat data -> OpenAI chat lines, the one format training and the validator read.

    line = to_openai(record, "auto", image_root="images")      # {"messages": [...]}
    python -m mm.vlm.formats llava_instruct.json train.jsonl --image_root images/

    llava     {"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
              "value": "<image>\\nWhat is ..."}]}, as a JSON list (LLaVA's files) or JSON lines
    sharegpt  {"conversations"|"messages": [{"from"|"role": "human"|"user"|"gpt"|"assistant"|"system",
              "value"|"content": str}], "images": [paths], "system"?: str}  (LLaMA-Factory's layout too)
    openai    {"messages": [...]} or a preference line: passed through as it is

Each "<image>" marker becomes an image_url part at its place, the i-th marker the i-th image; the text
around it becomes text parts (the "\\n" that LLaVA writes after the marker goes). A record with images
and no marker gets them at the start of its first user turn, where LLaVA's own preprocessing puts them;
any other count of markers against images is an error, as in LLaMA-Factory. Relative image paths are
joined to `image_root`; URLs (data:, file:, http(s):) and absolute paths are kept. Errors are
ChatFormatError with the reason; the checks OpenAI lines need beyond this (roles, empty content, an
assistant to learn from) are mm.decoders.chat_decoder's, run by mm.vlm.validate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator

from mm.decoders import ChatFormatError
from mm.vlm.chat import IMAGE_TOKEN

FORMATS = ("auto", "openai", "llava", "sharegpt")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # data:, file:, http(s):; two letters at least, so not "C:"


def detect_format(record) -> str:
    """"openai", "llava" or "sharegpt", from the record's keys; ChatFormatError when it is none of them."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    if "image" in record:
        return "llava"
    turns = record.get("conversations", record.get("messages"))
    if "images" in record or "conversations" in record:
        return "sharegpt"
    if "input" in record or (isinstance(turns, list) and not any(isinstance(t, dict) and "from" in t for t in turns)):
        return "openai"
    if isinstance(turns, list):
        return "sharegpt"
    raise ChatFormatError(f"not a chat record: no messages, conversations or input (keys: {sorted(record)})")


def to_openai(record, fmt: str = "auto", image_root: str | None = None) -> dict:
    """One record of `fmt` (one of FORMATS) -> an OpenAI chat line {"messages": [...]}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if not isinstance(record, dict):
        raise ChatFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "openai":
        return record
    key = "conversations" if fmt == "llava" or "conversations" in record else "messages"
    turns = [_turn(t, i) for i, t in enumerate(_list(record, key))]
    if fmt == "sharegpt" and record.get("system"):
        turns.insert(0, ("system", _text(record["system"], "system")))
    images = _image_list(record, "image" if fmt == "llava" else "images")
    images = [_resolve(path, image_root) for path in images]
    return {"messages": _messages(turns, images)}


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"\"{key}\" must be a non-empty list of turns, got {value!r:.60}")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(f"{where}: the text must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ChatFormatError(f"{where}: empty text")
    return value


def _turn(turn, i: int) -> tuple[str, str]:
    """(OpenAI role, text) of one LLaVA/ShareGPT turn."""
    if not isinstance(turn, dict):
        raise ChatFormatError(f"turn {i}: must be an object, got {type(turn).__name__}")
    speaker = turn.get("from", turn.get("role"))
    if speaker not in ROLE_NAMES:
        raise ChatFormatError(f"turn {i}: unknown speaker {speaker!r} (accepted: {', '.join(ROLE_NAMES)}); "
                              "tool calls and observations are not supported")
    return ROLE_NAMES[speaker], _text(turn.get("value", turn.get("content")), f"turn {i} ({speaker})")


def _image_list(record: dict, key: str) -> list[str]:
    images = record.get(key, [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ChatFormatError(f"\"{key}\" must be a path or a list of paths, got {record.get(key)!r:.60}")
    return images


def _resolve(path: str, image_root: str | None) -> str:
    """A relative path joined to image_root; a URL or absolute path as it is."""
    if _URL.match(path) or os.path.isabs(path) or image_root is None:
        return path
    return os.path.normpath(os.path.join(image_root, path))


def _messages(turns: list[tuple[str, str]], images: list[str]) -> list[dict]:
    """Turns with "<image>" markers + image paths -> OpenAI messages, an image_url part per marker."""
    markers = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if images and not markers:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise ChatFormatError(f"{len(images)} image(s) and no user turn to put them in")
        turns = list(turns)
        turns[first_user] = ("user", IMAGE_TOKEN * len(images) + "\n" + turns[first_user][1])
    elif markers != len(images):
        raise ChatFormatError(f"{markers} {IMAGE_TOKEN} marker(s) for {len(images)} image(s)")
    out, next_image = [], 0
    for i, (role, text) in enumerate(turns):
        if IMAGE_TOKEN not in text:
            out.append({"role": role, "content": text})
            continue
        if role != "user":
            raise ChatFormatError(f"turn {i} ({role}): an {IMAGE_TOKEN} marker; images go in user turns")
        parts = []
        for j, piece in enumerate(text.split(IMAGE_TOKEN)):
            if j:
                parts.append({"type": "image_url", "image_url": {"url": images[next_image]}})
                next_image += 1
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": role, "content": parts})
    return out


# ---------------------------------------------------------------- files

@dataclass
class ConvertStats:
    """What convert_file did: lines written, and the records it could not convert."""
    written: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, or record number in a JSON list; reason)
    unit: str = "line"


def read_records(path: str) -> tuple[str, Iterator[tuple[int, object]]]:
    """("record", records of a JSON list file) or ("line", lines of a JSONL file); each item is
    (number from 1, the parsed record, or the ValueError that parsing raised)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
            return "record", iter(list(enumerate(records, 1)))
        except ValueError:
            pass  # not one JSON list: read it as lines, each reported
    return "line", _jsonl(text)


def _jsonl(text: str) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except ValueError as e:
                yield i, ChatFormatError(f"not valid JSON ({e})")


def convert_file(src: str, dst: str, fmt: str = "auto", image_root: str | None = None) -> ConvertStats:
    """LLaVA/ShareGPT file (JSON list or JSONL) -> OpenAI chat JSONL at dst, one line per record.

    Relative image paths are resolved against image_root (default: src's folder) and written relative
    to dst's folder, which is what the loader and the validator resolve them against. A record that
    fails is left out and listed in the returned stats; the others are written.
    """
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(src)))
    root_from_dst = os.path.relpath(root, os.path.dirname(os.path.abspath(dst)))
    unit, records = read_records(src)
    stats = ConvertStats(unit=unit)
    tmp = f"{dst}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for number, record in records:
            try:
                if isinstance(record, Exception):
                    raise record
                line = to_openai(record, fmt, root_from_dst)
            except ChatFormatError as e:
                stats.failed.append((number, str(e)))
                continue
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            stats.written += 1
    os.replace(tmp, dst)  # a half-written file never sits at dst
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm.vlm.formats",
                                     description="Convert LLaVA or ShareGPT chat data to OpenAI chat JSONL.")
    parser.add_argument("src", help="a JSON list or JSONL file of LLaVA/ShareGPT records")
    parser.add_argument("dst", help="the OpenAI chat JSONL to write")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="the records' format (default: detected)")
    parser.add_argument("--image_root", default=None, help="folder relative image paths start from (default: src's)")
    args = parser.parse_args(argv)
    stats = convert_file(args.src, args.dst, args.format, args.image_root)
    print(f"wrote {stats.written} lines to {args.dst}; {len(stats.failed)} {stats.unit}s failed")
    for number, reason in stats.failed:
        print(f"  {stats.unit} {number}: {reason}")
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
