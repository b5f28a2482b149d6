"""Check a chat JSONL before training on it, as OpenAI's fine-tuning data checker does.

    python -m mm.vlm.validate data.jsonl [--tokenizer DIR | --gguf FILE] [--max_tokens N] [--epochs N]

Every bad line is reported with its line number and reason; then the statistics: examples, images,
tokens per example, tokens in the loss, tokens x epochs. The exit code is 1 when a line is bad.

Each line goes through exactly what training runs on it: the loader's reading of a JSONL manifest
(mm.shards.read_jsonl_lines, so line numbers and the folder image paths start from are the loader's),
mm.decoders.chat_decoder (format, roles, keys, images opened and decoded with the same limits), and,
given a tokenizer, mm.vlm.chat's tokenization with the tokenizer's chat template. So training and the
validator cannot disagree on what a good line is. The recipe calls validate_file at start and refuses
a file with errors, or skips the lines in report.errors when told to.

Reasons are "<kind>: <detail>", kind one of REASONS.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from mm.decoders import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, ChatFormatError, chat_decoder, sample_name
from mm.media import DEFAULT_MAX_PIXELS, ImageTooLarge, NotAnImage, RefTooLarge, UnreadableRef
from mm.shards import Unit, read_jsonl_lines
from mm.vlm.chat import IMAGE_TOKEN, NoAnswerTokens, TemplateMismatch, count_tokens, tokenize_preference

DEFAULT_MAX_TOKENS = 2048  # per example (per side of a preference pair), image tokens included
DEFAULT_IMAGE_TOKENS = 64  # what one image costs in the LM's sequence: a 224 px ViT-B/16 pixel-shuffled by 2

REASONS = {  # kind -> what it means; format_report lists the counts in this order
    "not_json": "the line is not valid JSON",
    "not_object": "the line is not a JSON object",
    "no_messages": "no \"messages\" list (nor a preference \"input\")",
    "missing_key": "a message without a role",
    "unknown_key": "a message with an unknown key",
    "unknown_role": "a message with an unknown role",
    "missing_content": "a message with no or empty content",
    "bad_message": "a message that is not an object, or a bad name",
    "bad_content": "malformed content parts",
    "bad_weight": "a weight that is not 0 or 1, or not on an assistant message",
    "no_assistant": "no assistant message with weight 1: nothing to learn",
    "bad_preference": "a preference line whose input or outputs are malformed",
    "unsupported": "tool calls or tool definitions",
    "image_not_in_user": "an image in an assistant or system message",
    "too_many_images": "more images than allowed",
    "image_unreadable": "an image that cannot be read or decoded",
    "image_too_large": "an image over the pixel or byte limit",
    "template_mismatch": "the tokenizer's chat template does not give clean answer tokens",
    "too_many_tokens": "over the token limit",
    "no_answer_tokens": "no token in the loss",
    "other": "anything else",
}

# The decoder's ChatFormatError messages -> kinds, first match wins. Tested line by line in
# tests/test_vlm_validate.py, so a reworded decoder message shows up there, not as a wrong count.
_FORMAT_KINDS = [
    (r"the line is a JSON \w+, not an object", "not_object"),
    (r"neither \"messages\"|messages must be a non-empty list", "no_messages"),
    (r"tool definitions", "unsupported"),
    (r"no assistant message|every assistant message has weight 0", "no_assistant"),
    (r"unknown role None", "missing_key"),
    (r"unknown role", "unknown_role"),
    (r"unsupported key", "unknown_key"),
    (r": (no|empty) content$", "missing_content"),
    (r"images are accepted in user messages only", "image_not_in_user"),
    (r"\d+ images, over the limit", "too_many_images"),
    (r"weight", "bad_weight"),
    (r"preferred_output|last input message|\"input\" must", "bad_preference"),
    (r"a message must be an object|name must be", "bad_message"),
]


class TooManyTokens(ValueError):
    """An example over the validator's token limit (training would truncate it)."""


def classify(error: Exception) -> str:
    """The REASONS kind of an error the decoder or the tokenization raised on a line."""
    if isinstance(error, ChatFormatError):
        return next((kind for pattern, kind in _FORMAT_KINDS if re.search(pattern, str(error))), "bad_content")
    if isinstance(error, (RefTooLarge, ImageTooLarge)):  # RefTooLarge is an UnreadableRef: first
        return "image_too_large"
    if isinstance(error, (FileNotFoundError, UnreadableRef, NotAnImage)):
        return "image_unreadable"
    if isinstance(error, TemplateMismatch):
        return "template_mismatch"
    if isinstance(error, TooManyTokens):
        return "too_many_tokens"
    if isinstance(error, NoAnswerTokens):
        return "no_answer_tokens"
    if isinstance(error, ValueError) and "is not valid JSON" in str(error):
        return "not_json"
    return "other"


@dataclass
class Report:
    """What validate_file found. Token statistics are None without a tokenizer."""
    path: str
    epochs: int = 1
    image_tokens: int = DEFAULT_IMAGE_TOKENS
    lines: int = 0                  # non-blank lines read
    examples: int = 0               # good lines
    preference_examples: int = 0    # of which preference pairs
    images: int = 0                 # in good lines
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, "kind: detail")
    bad_by_reason: Counter = field(default_factory=Counter)
    tokens_min: int | None = None   # per example: SFT conversation, or chosen + rejected of a pair
    tokens_max: int | None = None
    tokens_total: int | None = None
    loss_tokens: int | None = None  # tokens in the loss, all good examples

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def tokens_mean(self) -> float | None:
        return None if self.tokens_total is None or not self.examples else self.tokens_total / self.examples

    @property
    def epoch_tokens(self) -> int | None:
        """Tokens trained over all epochs: what OpenAI bills (n_billing_tokens_in_dataset x n_epochs)."""
        return None if self.tokens_total is None else self.tokens_total * self.epochs

    def add_tokens(self, n: int, n_loss: int) -> None:
        self.tokens_min = n if self.tokens_min is None else min(self.tokens_min, n)
        self.tokens_max = n if self.tokens_max is None else max(self.tokens_max, n)
        self.tokens_total = (self.tokens_total or 0) + n
        self.loss_tokens = (self.loss_tokens or 0) + n_loss


def _line_number(sample: dict) -> int:
    return int(sample["__key__"].rsplit(":", 1)[1])


def _detail(error: Exception, sample: dict) -> str:
    """The error's message without the "sample data:3: " the report's line number already says."""
    text, prefix = str(error), f"{sample_name(sample)}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def count_example_tokens(tokenizer, chat: dict, image_tokens: int, max_tokens: int, name: str) -> tuple[int, int]:
    """(tokens, tokens in the loss) of a decoded chat line; ValueError over max_tokens (a side of a pair)."""
    if "messages" in chat:
        sides = [count_tokens(tokenizer, chat["messages"], image_tokens, name)]
    else:
        pair = tokenize_preference(tokenizer, chat["prompt"], chat["chosen"], chat["rejected"], max_tokens=None,
                                   image_tokens=image_tokens, name=name)
        sides = [(len(side), side.n_loss_tokens) for side in pair]
    longest = max(n for n, _ in sides)
    if longest > max_tokens:
        raise TooManyTokens(f"{longest} tokens (an image counted as {image_tokens}), over the limit of {max_tokens}")
    return sum(n for n, _ in sides), sum(n for _, n in sides)


def validate_file(path: str, tokenizer=None, max_tokens: int = DEFAULT_MAX_TOKENS,
                  image_tokens: int = DEFAULT_IMAGE_TOKENS, epochs: int = 1, max_images: int = DEFAULT_MAX_IMAGES,
                  max_pixels: int = DEFAULT_MAX_PIXELS, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Report:
    """Check every line of a chat JSONL as training would read it; tokens counted only with a tokenizer."""
    if epochs < 1 or max_tokens < 1 or image_tokens < 1:
        raise ValueError(f"epochs, max_tokens and image_tokens must be >= 1, "
                         f"got {epochs}, {max_tokens}, {image_tokens}")
    decode = chat_decoder(max_pixels=max_pixels, max_images=max_images, max_image_bytes=max_image_bytes)
    report = Report(path, epochs=epochs, image_tokens=image_tokens)
    with open(path, "rb") as stream:
        for sample in read_jsonl_lines(stream, Unit(path)):
            report.lines += 1
            try:
                chat = decode(sample)
                counted = None if tokenizer is None else \
                    count_example_tokens(tokenizer, chat, image_tokens, max_tokens, sample_name(sample))
            except Exception as e:  # noqa: BLE001 - every bad line is reported, none stops the check
                kind = classify(e)
                report.errors.append((_line_number(sample), f"{kind}: {_detail(e, sample)}"))
                report.bad_by_reason[kind] += 1
                continue
            report.examples += 1
            report.preference_examples += "messages" not in chat
            report.images += len(chat["images"])
            if counted:
                report.add_tokens(*counted)
    return report


def format_report(report: Report) -> str:
    """The report as a person reads it: each bad line, then the counts."""
    out = [f"{report.path}: {report.lines} lines, {len(report.errors)} bad"]
    out += [f"line {line}: {reason}" for line, reason in report.errors]
    if report.errors:
        counts = ", ".join(f"{kind} {report.bad_by_reason[kind]}" for kind in REASONS if report.bad_by_reason[kind])
        out.append(f"bad lines by reason: {counts}")
    out.append(f"examples: {report.examples}" + (f" ({report.preference_examples} preference pairs)"
                                                 if report.preference_examples else ""))
    out.append(f"images: {report.images}")
    if report.tokens_total is None:
        out.append("tokens: not counted (give --tokenizer DIR or --gguf FILE)")
    else:
        out.append(f"tokens per example: min {report.tokens_min:,}, mean {report.tokens_mean:,.1f}, "
                   f"max {report.tokens_max:,} (an image counted as {report.image_tokens})")
        out.append(f"tokens in the loss: {report.loss_tokens:,}")
        out.append(f"tokens x epochs: {report.tokens_total:,} x {report.epochs} = {report.epoch_tokens:,}")
    return "\n".join(out)


def load_tokenizer(tokenizer_dir: str | None = None, gguf: str | None = None):
    """A Hugging Face tokenizer from a folder or a GGUF file, with IMAGE_TOKEN added as the LM loader adds it."""
    from transformers import AutoTokenizer

    if gguf is not None:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)),
                                                  gguf_file=os.path.basename(gguf))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm.vlm.validate",
                                     description="Check an OpenAI chat JSONL for vision-chat fine-tuning.")
    parser.add_argument("path", help="the chat JSONL (image paths relative to its folder)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder, to count tokens")
    source.add_argument("--gguf", default=None, help="a GGUF language model file, whose tokenizer counts tokens")
    parser.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per example at most")
    parser.add_argument("--image_tokens", type=int, default=DEFAULT_IMAGE_TOKENS, help="tokens one image costs")
    parser.add_argument("--epochs", type=int, default=1, help="epochs, for tokens x epochs")
    parser.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES, help="images per example at most")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="pixels per image at most")
    parser.add_argument("--max_image_bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="bytes per image file")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.path):
        print(f"{args.path}: no such file", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer, args.gguf) if args.tokenizer or args.gguf else None
    report = validate_file(args.path, tokenizer, args.max_tokens, args.image_tokens, args.epochs, args.max_images,
                           args.max_pixels, args.max_image_bytes)
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
