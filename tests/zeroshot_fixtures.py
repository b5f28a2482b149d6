"""What the zero-shot tests share: rendered shape images, PNG bombs, and servers started in a
subprocess as a user starts them. The trained tiny CLIP run is the `trained_clip` fixture in conftest."""
from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.helpers import ROOT, SUBPROCESS_ENV

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
def render_shapes(n: int, seed: int, image_size: int = 32):
    """n fresh single-object scenes from the synthetic data's renderer: [(PIL image, "colour shape")]."""
    from data_tools.synthetic_clip import make_sample

    rng = random.Random(seed)
    return [(img, label) for img, _, label in (make_sample(rng, image_size, multi_prob=0.0) for _ in range(n))]


def shape_png(path: Path, colour: str = "red", shape: str = "circle", size: int = 32) -> Path:
    """One centred shape, large, on white, saved as PNG."""
    from data_tools.synthetic_clip import BACKGROUNDS, COLOURS as RGB, render

    render([(shape, RGB[colour], size / 2, size / 2, size * 0.3)], BACKGROUNDS["white"], size).save(path)
    return path


def png_declaring(width: int, height: int, rows: int | None = None) -> bytes:
    """A PNG of width x height black RGB pixels whose data compresses ~1000:1, i.e. a decompression bomb.

    rows: compress only this many rows (a truncated file); for sizes too big to even compress.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)  # filter byte + RGB
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, log_path: Path, cwd: Path = ROOT):
    """Run `cmd` (a server) in a subprocess until `ready_url` answers 200; stop it afterwards.

    Yields the Popen; its output goes to `log_path`. No deadline: a server that dies fails the
    test with its log, one that is slow to start just takes longer.
    """
    import requests

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SUBPROCESS_ENV})
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
                with contextlib.suppress(requests.RequestException):  # not up yet
                    if requests.get(ready_url, timeout=30).status_code == 200:
                        break
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
