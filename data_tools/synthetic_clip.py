"""Synthetic image-caption shards: the built-in data that makes the CLIP recipe run out of the box.

Each image shows 1-3 rendered objects that vary in shape, colour, size, position, count and
background; its caption comes from one of several templates. Three splits:

    <out>/train/shard-*.tar      image-caption pairs (png, txt)
    <out>/val/shard-*.tar        held-out pairs for image<->text retrieval
    <out>/zeroshot/shard-*.tar   held-out labelled images (png, json {"label", "label_index"})
    <out>/zeroshot/classnames.json, templates.json   the zero-shot classes ("red circle", ...) and prompts
    <out>/info.json              what was written (its presence means the data is complete)

Zero-shot prompts ("a photo of a red circle.") never occur verbatim as training captions:
`write_synthetic_clip` checks this and fails if a template change ever breaks it.

    python -m data_tools.synthetic_clip --out=data/clip_synth --train=60000
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {  # name -> RGB; objects get a small random shade jitter around these
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": (0.13, 0.17), "medium": (0.19, 0.24), "large": (0.27, 0.33)}  # radius / image side
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

CAPTION_TEMPLATES = (  # single object
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape} in the {pos}",
    "{size} {colour} {shape}, {bg} background",
    "there is a {colour} {shape} near the {pos} of the image",
    "an image with one {colour} {shape}",
    "a {colour} {shape} drawn at the {pos} on {bg}",
    "{colour} {shape}",
)
MULTI_TEMPLATES = (  # 2-3 objects of one kind
    "{count} {colour} {shape}s on a {bg} background",
    "an image with {count} {size} {colour} {shape}s",
    "{count} {colour} {shape}s",
)
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a rendering of a {}.", "a picture showing a {}.", "a {} in an image.")


def class_names() -> list[str]:
    """The zero-shot classes: every colour x shape, e.g. "red circle" (36 classes)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for `shape` centred at (cx, cy) with radius r in pixels; None for a circle."""
    def ring(n, radii, phase):
        return [(cx + radii[i % len(radii)] * math.cos(phase + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]
    if shape == "circle":
        return None
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "diamond":
        return ring(4, [r * 1.15, r * 0.7], -math.pi / 2)
    if shape == "triangle":
        return ring(3, [r * 1.1], -math.pi / 2)
    if shape == "star":
        return ring(10, [r * 1.15, r * 0.45], -math.pi / 2)
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx + x, cy + y) for x, y in [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                                               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(objects: list[tuple[str, tuple[int, int, int], float, float, float]], bg: tuple[int, int, int],
           size: int) -> Image.Image:
    """Draw objects [(shape, rgb, cx, cy, r)] (coordinates in pixels) on a plain background."""
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for shape, rgb, cx, cy, r in objects:
        pts = shape_points(shape, cx, cy, r)
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(pts, fill=rgb)
    return img


def _jitter(rgb, rng, amount=18):
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def make_sample(rng: random.Random, image_size: int, multi_prob: float = 0.25,
                label: str | None = None) -> tuple[Image.Image, str, str]:
    """One random scene -> (image, caption, class name "colour shape"); `label` fixes the class."""
    colour, shape = label.split(" ") if label else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    bg = rng.choice(list(BACKGROUNDS))
    size_word = rng.choice(list(SIZES))
    lo, hi = SIZES[size_word]
    count = rng.choice([2, 3]) if rng.random() < multi_prob else 1
    if count > 1:
        lo, hi = lo * 0.7, hi * 0.7  # several objects must fit
    objects, pos_word = [], rng.choice(list(POSITIONS))
    for i in range(count):
        r = rng.uniform(lo, hi) * image_size
        if count == 1:
            px, py = POSITIONS[pos_word]
            cx, cy = (px + rng.uniform(-0.06, 0.06)) * image_size, (py + rng.uniform(-0.06, 0.06)) * image_size
        else:  # spread along a random diagonal-ish line so objects rarely overlap
            t = (i + 0.5) / count
            cx, cy = (0.2 + 0.6 * t) * image_size, rng.uniform(0.3, 0.7) * image_size
        cx, cy = min(max(cx, r), image_size - r), min(max(cy, r), image_size - r)
        objects.append((shape, _jitter(COLOURS[colour], rng), cx, cy, r))
    img = render(objects, _jitter(BACKGROUNDS[bg], rng, 10), image_size)
    template = rng.choice(CAPTION_TEMPLATES if count == 1 else MULTI_TEMPLATES)
    caption = template.format(size=size_word, colour=colour, shape=shape, bg=bg, pos=pos_word, count=COUNT_WORDS[count])
    return img, caption, f"{colour} {shape}"


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes, fast to write (compress level 1): the images are tiny."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_split(out: Path, n: int, seed: int, image_size: int, per_shard: int, labelled: bool, desc: str) -> set[str]:
    """Write `n` samples as shards under `out`; returns the set of captions written."""
    out.mkdir(parents=True, exist_ok=True)
    rng, names, captions = random.Random(seed), class_names(), set()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in tqdm(range(n), desc=desc, unit="img", mininterval=2):
            # the labelled split is balanced: class i % C for sample i
            img, caption, label = make_sample(rng, image_size, multi_prob=0.0 if labelled else 0.25,
                                              label=names[i % len(names)] if labelled else None)
            sample = {"__key__": f"{i:08d}", "png": encode_png(img), "txt": caption}
            if labelled:
                sample["json"] = json.dumps({"label": label, "label_index": names.index(label)}).encode()
            sink.write(sample)
            captions.add(caption)
    return captions


def check_prompts_unseen(captions: set[str]) -> None:
    """Fail if any zero-shot prompt is also a training caption (the held-out set would leak)."""
    leaked = [t.format(c) for c in class_names() for t in ZEROSHOT_TEMPLATES if t.format(c) in captions]
    if leaked:
        raise AssertionError(f"zero-shot prompts appear verbatim as training captions: {leaked[:5]}")


def write_heldout_splits(out: Path, val: int, zeroshot_per_class: int, image_size: int, per_shard: int,
                         seed: int) -> int:
    """The val and zero-shot splits (and the zero-shot class names and prompts) under `out`; returns the
    number of zero-shot images. Other training sets (data_tools.synthetic_noisy_clip) share them."""
    write_split(out / "val", val, seed + 1, image_size, per_shard, False, "val shards")
    n_zs = zeroshot_per_class * len(class_names())
    write_split(out / "zeroshot", n_zs, seed + 2, image_size, per_shard, True, "zero-shot shards")
    (out / "zeroshot" / "classnames.json").write_text(json.dumps(class_names(), indent=1))
    (out / "zeroshot" / "templates.json").write_text(json.dumps(list(ZEROSHOT_TEMPLATES), indent=1))
    return n_zs


def write_synthetic_clip(out: str | Path, train: int = 60000, val: int = 1000, zeroshot_per_class: int = 20,
                         image_size: int = 64, per_shard: int = 2500, seed: int = 0) -> dict:
    """Write the three splits and info.json under `out`; returns the info dict."""
    out = Path(out)
    captions = write_split(out / "train", train, seed, image_size, per_shard, False, "train shards")
    check_prompts_unseen(captions)
    n_zs = write_heldout_splits(out, val, zeroshot_per_class, image_size, per_shard, seed)
    info = {"train": train, "val": val, "zeroshot": n_zs, "classes": len(class_names()),
            "image_size": image_size, "seed": seed, "distinct_train_captions": len(captions)}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info


def ensure_synthetic_clip(out: str | Path, **kwargs) -> dict:
    """Write the data unless a complete copy with the same settings is already there."""
    info_path = Path(out) / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        want = {k: kwargs[k] for k in ("train", "val", "image_size", "seed") if k in kwargs}
        if all(info.get(k) == v for k, v in want.items()):
            return info
    return write_synthetic_clip(out, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/clip_synth")
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--zeroshot_per_class", type=int, default=20)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--per_shard", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = write_synthetic_clip(a.out, a.train, a.val, a.zeroshot_per_class, a.image_size, a.per_shard, a.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
