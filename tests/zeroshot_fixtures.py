"""What the zero-shot tests share: rendered shape images, PNG bombs, unusable prompt templates, hostile
checkpoints, and servers started in a subprocess as a user starts them. The trained tiny CLIP run is the
`trained_clip` fixture in conftest."""
from __future__ import annotations

import contextlib
import os
import random
import shlex
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.helpers import ROOT, SUBPROCESS_ENV

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]

# Templates the classifier, CLI and server must refuse, with words their message must hold. Each one
# used to get past the "'{}' occurs" check and then fail (or worse) in str.format.
BAD_TEMPLATES = {
    "{} {x}": "has 2 placeholders",                    # KeyError: 'x'
    "{}{0}": "has 2 placeholders",                     # ValueError: cannot switch from automatic numbering
    "{} and {}": "has 2 placeholders",                 # IndexError: one label for two fields
    "{.__class__} {}": "has 2 placeholders",           # attribute access on the label
    "{.__class__}": "must be a bare '{}'",
    "{0}": "must be a bare '{}'",
    "{!r}": "must be a bare '{}'",
    "{}{": "malformed",                                # ValueError: Single '{' encountered
    "}{}": "malformed",
    "{{}}{:>100000000}": "must be a bare '{}'",        # 20 characters that make each prompt 100 MB
    "a photo": "has 0 placeholders",
    "{{}}": "has 0 placeholders",                      # escaped braces are text, not a placeholder
}


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


def png_declaring(width: int, height: int, rows: int | None = None, rgba: bool = False) -> bytes:
    """A PNG of width x height black RGB pixels whose data compresses ~1000:1, i.e. a decompression bomb.

    rows: compress only this many rows (a truncated file); for sizes too big to even compress.
    rgba: transparent black RGBA pixels (PNG colour type 6), a mode gradio converts unless told not to.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels, colour_type = (4, 6) if rgba else (3, 2)
    z, row = zlib.compressobj(9), b"\x00" * (1 + channels * width)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8 bits per channel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class RunsCommand:
    """Unpickling this runs `touch marker`: what a hostile checkpoint does, made harmless and visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_checkpoint(run_dir: Path, state) -> Path:
    """`state` saved as run_dir/checkpoints/step_00000001.pt, where recipes/clip/train.py puts its own."""
    import torch

    path = run_dir / "checkpoints" / "step_00000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def write_hostile_checkpoint(run_dir: Path, marker: Path) -> Path:
    """A step_*.pt whose model_cfg, once unpickled, has run `touch marker`; checked to do so when loaded
    unsafely, so a test that finds no marker after using it proves the file was refused."""
    import torch

    path = write_checkpoint(run_dir, {"model": {}, "extra": {"model_cfg": RunsCommand(marker)}})
    torch.load(path, weights_only=False)  # what a trusting loader does
    assert marker.exists(), "the hostile checkpoint should run its command when loaded unsafely"
    marker.unlink()
    return path


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
