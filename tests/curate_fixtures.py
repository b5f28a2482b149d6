"""Small shards for the curation tests: crafted image-text and speech samples, written as WebDataset tars,
and helpers to read what a tool wrote. Importable by every tests/test_curate_*.py."""
from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np

from tests.helpers import write_tar


def image_bytes(colour=(200, 30, 30), size=(32, 32), fmt="PNG", quality: int = 90) -> bytes:
    """A flat image of one colour."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def noise_image(seed: int, size: int = 32, block: int = 4):
    """A PIL image of random `block`-pixel squares: distinct seeds give images far apart in pHash (~32 bits)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(size // block, size // block, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


def encode(image, fmt="PNG", quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    """Image bytes, optionally resized first (a near duplicate: resized, or JPEG re-encoded). JPEG keeps full
    colour resolution (4:4:4): at 32 px, 4:2:0 shifts saturated colours by ~8 of 255 per 8x8 cell."""
    from PIL import Image

    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": quality, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


def noise_png(seed: int, size: int = 32, block: int = 4) -> bytes:
    return encode(noise_image(seed, size, block))


def pair(key: str, image: bytes, caption: str, ext: str = "png", **fields) -> dict:
    """An image-text sample as write_shards makes it ({"__key__", <image ext>, "txt"}), plus any extra fields."""
    return {"__key__": key, ext: image, "txt": caption.encode("utf-8"), **fields}


def tone_flac(seconds: float, silent_seconds: float = 0.0, amplitude: float = 0.3, sample_rate: int = 16000) -> bytes:
    """FLAC bytes: a 440 Hz tone of `seconds`, then `silent_seconds` of digital silence."""
    import soundfile

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = np.concatenate([amplitude * np.sin(2 * np.pi * 440 * t), np.zeros(int(silent_seconds * sample_rate))])
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def speech(key: str, audio: bytes, text: str, language: str = "en", duration: float | None = None) -> dict:
    """An ASR sample as write_asr_shards makes it: {"__key__", "flac", "json": {"text", "language", "duration"}}."""
    meta = {"text": text, "language": language, "duration": duration, "source": f"{key}.flac"}
    return {"__key__": key, "flac": audio, "json": json.dumps(meta).encode("utf-8")}


def write_shards(folder: Path, samples: list[dict], per_shard: int = 10) -> list[Path]:
    """`samples` as folder/shard-000000.tar, ... of `per_shard` samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"shard-{i // per_shard:06d}.tar", samples[i:i + per_shard])
            for i in range(0, len(samples), per_shard)]


def noise_pairs(n: int, seed: int = 0, size: int = 32, block: int = 4) -> list[dict]:
    """n distinct image-text samples (noise images, captions "item <i>")."""
    rng = random.Random(seed)
    return [pair(f"{i:06d}", noise_png(rng.randrange(2**31), size, block), f"item {i}") for i in range(n)]


def read_output(folder: Path) -> list[dict]:
    """Every sample of the .tar shards in `folder` (or of one shard), in shard order (without __url__)."""
    from mm.shards import COUNTS, read_samples

    counts = dict.fromkeys(COUNTS, 0)
    urls = [str(folder)] if Path(folder).is_file() else sorted(str(p) for p in Path(folder).glob("*.tar"))
    out = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples(urls, counts)]
    assert counts["bad_shards"] == 0, f"unreadable output shards in {folder}"
    return out


def keys(samples: list[dict]) -> list[str]:
    return [s["__key__"] for s in samples]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`: compare before and after a run to show the input is unchanged."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def read_report(folder: Path) -> dict:
    return json.loads((Path(folder) / "report.json").read_text())


def step_report(report: dict, step: str) -> dict:
    (found,) = [s for s in report["steps"] if s["step"] == step]
    return found


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut a shard short, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
