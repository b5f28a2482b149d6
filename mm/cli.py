"""Command-line pieces the servers and demos share: where to serve, on which device, and argument types.

    p = argparse.ArgumentParser(...)
    add_serve_arguments(p, port=8000)                 # --device, --host, --port
    p.add_argument("--max-file-size", type=file_size, default="10mb")
"""
from __future__ import annotations

import argparse
import re


def add_device_argument(parser) -> None:
    """--device, on a parser or an argument group: every tool that loads a model takes it the same way."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


def add_serve_arguments(parser: argparse.ArgumentParser, port: int, device: bool = True) -> None:
    """--device (unless device=False: a tool that declares its own), --host (127.0.0.1: this machine only) and
    --port (default `port`)."""
    if device:
        add_device_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network "
                                                            "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=port, help="(default: %(default)s)")


def file_size(text: str) -> int:
    """Bytes from "25mb", "800kb", "1gb" or a plain number (units of 1024, as gradio counts them)."""
    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*", text.lower())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 25mb, 800kb or 1gb")
    return int(match.group(1)) * 1024 ** ("b", "kb", "mb", "gb").index(match.group(2) or "b")


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value
