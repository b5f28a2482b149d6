"""A noisy copy of the built-in CLIP data (data_tools.synthetic_clip), for the curation benchmark: the same
renderer, captions and held-out splits, with known faults injected into the training split.

    <out>/train/shard-*.tar     png (jpg for JPEG re-encoded duplicates) + txt, keys "00000042" as the built-in
    <out>/val, <out>/zeroshot   clean held-out splits, identical to the built-in data's for the same seed and size
    <out>/truth.jsonl           one line per training sample: {"key", "shard", "kind", "class", "caption_class",
                                "original", "edit"}
    <out>/info.json             settings, counts per kind and the filter thresholds this data is meant for (written
                                last: its presence means the data is complete)

Kinds of training sample (fractions of --n, each kind caught by exactly one curation rule):

  swapped         (30%) the image of one scene with the caption of another sample whose class ("red circle")
                  differs: "caption_class" names the caption's class, "class" the image's
  near_dup        (20%) a copy of a clean sample's image in ANOTHER shard ("original": its key), resized by a
                  factor of 0.8-0.9 or 1.1-1.25, or re-encoded as JPEG at quality 60-85 with 4:4:4 chroma ("edit"
                  says which), with the original's caption or a paraphrase of it. Each original has one copy
                  (groups of two).
  tiny            (1.5%) a square image shrunk to a side of image_size/4 .. image_size/2 (8-16 px at 32 px)
  extreme_aspect  (1.5%) the image padded with its background to an aspect of 3.5-5 (its short side kept)
  clean           the rest, as the built-in data makes them

JPEG copies keep full-resolution chroma (4:4:4) by default: at 32 px, 4:2:0 subsampling leaves a 16 x 16 colour
grid, which moves a copy's 8 x 8 mean colours (what dedup's colour check compares) as far from its original as
many distinct scenes are from their nearest neighbour, so no pixel dedup could tell those copies from new images
(measured in benchmarks/RESULTS.md, "Data curation"). On web-sized images 4:2:0 barely moves an 8 x 8 thumbnail.
`--jpeg_subsampling=2` writes 4:2:0 copies, to measure exactly that.

The images here are image_size pixels (32 by default, what the default recipe trains at), so DataComp's basic
filter (min side >= 200 on web images) is scaled: info.json's "filter_min_side" is 3/4 of image_size (24 at
32 px), which keeps every clean image and every near-duplicate (>= 0.8 x image_size) and drops every tiny one
(<= 1/2 x image_size); "filter_max_aspect" is DataComp's 3, which only the extreme_aspect images exceed.

Sample i is rendered from its own seeded RNG, so any sample can be re-rendered alone (a duplicate's original,
a swapped caption's donor) without holding the set in memory, and the output is the same for the same seed.

    python -m data_tools.synthetic_noisy_clip --output=data/clip_noisy --n=40000 --seed=0
    python recipes/clip/train.py --train_data=data/clip_noisy/train --val_data=data/clip_noisy/val \\
        --zeroshot_data=data/clip_noisy/zeroshot
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_tools.synthetic_clip import (check_prompts_unseen, class_names, encode_png, make_sample,
                                     write_heldout_splits)
from data_tools.curate.io import ShardWriter
from data_tools.write_shards import remove_stale_shards

KINDS = ("clean", "swapped", "near_dup", "tiny", "extreme_aspect")
PARAPHRASES = ("an image of {}", "{}, drawn", "a picture: {}", "{} (a drawing)")  # none is a zero-shot prompt
DUP_FACTORS = ((0.8, 0.9), (1.1, 1.25))  # a near-duplicate is resized down or up by a factor in one of these
DUP_JPEG_QUALITY = (60, 85)
JPEG_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # PIL's `subsampling` values
EXTREME_ASPECTS = (3.5, 5.0)
MAX_ASPECT = 3.0  # DataComp's basic filter
SHARD_PATTERN = "shard-%06d.tar"


def filter_min_side(image_size: int) -> int:
    """The min-side threshold for this data: between the near-duplicates' smallest side (0.8 x) and the
    tiny images' largest (0.5 x)."""
    return 3 * image_size // 4


def tiny_sides(image_size: int) -> tuple[int, int]:
    """The range (inclusive) of a tiny image's side, in pixels."""
    return max(1, image_size // 4), max(1, image_size // 2)


@dataclass
class NoisePlan:
    """What each training sample i will be: kinds[i]; classes[i], the class of scene i; partner[i], the
    caption donor of a swapped sample or the original of a near-duplicate."""
    kinds: list[str]
    classes: list[str]
    partner: dict[int, int]


def count_kinds(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many samples of each kind; ValueError when the fractions leave too few clean originals."""
    bad = {k: f for k, f in fractions.items() if not 0 <= f <= 1}
    if bad:
        raise ValueError(f"fractions must be in [0, 1], got {bad}")
    counts = {k: round(f * n) for k, f in fractions.items()}
    counts["clean"] = n - sum(counts.values())
    if counts["clean"] < counts.get("near_dup", 0):
        raise ValueError(f"{counts['clean']} clean samples cannot be the originals of {counts['near_dup']} "
                         f"near-duplicates: lower the fractions (they sum to {sum(fractions.values()):g})")
    return {k: counts.get(k, 0) for k in KINDS}


def plan_noise(n: int, per_shard: int, seed: int, fractions: dict[str, float]) -> NoisePlan:
    """Deal the kinds to the n samples at random, and pick each swapped caption's donor (a sample of another
    class) and each near-duplicate's original (a clean sample in another shard, used once)."""
    counts = count_kinds(n, fractions)
    if counts["near_dup"] and n <= per_shard:
        raise ValueError(f"near-duplicates go in another shard than their original: n={n} needs more than one "
                         f"shard of per_shard={per_shard}")
    rng = random.Random(f"{seed}-plan")
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    names = class_names()
    classes = [rng.choice(names) for _ in range(n)]
    if counts["swapped"] and len(set(classes)) < 2:
        raise ValueError(f"all {n} samples drew one class: no caption of another class to swap in; raise n")
    partner = {}
    for i, kind in enumerate(kinds):
        if kind == "swapped":
            j = i
            while classes[j] == classes[i]:  # i itself has the same class, so j != i too
                j = rng.randrange(n)
            partner[i] = j
    pool = [i for i, kind in enumerate(kinds) if kind == "clean"]
    rng.shuffle(pool)
    for i, kind in enumerate(kinds):
        if kind == "near_dup":
            partner[i] = take_from_other_shard(pool, i // per_shard, per_shard)
    return NoisePlan(kinds, classes, partner)


def take_from_other_shard(pool: list[int], shard: int, per_shard: int) -> int:
    """Remove and return the last index in `pool` that lies outside `shard` (swap-remove: O(1) once found)."""
    for at in range(len(pool) - 1, -1, -1):
        if pool[at] // per_shard != shard:
            found, pool[at] = pool[at], pool[-1]
            pool.pop()
            return found
    raise ValueError(f"no clean sample left outside shard {shard} to duplicate: write more shards")


# ---------------------------------------------------------------- one sample

def render_scene(seed: int, i: int, image_size: int, label: str) -> tuple[Image.Image, str]:
    """Scene i of the training split, as the built-in data draws one: (image, its caption)."""
    image, caption, _ = make_sample(random.Random(f"{seed}-{i}"), image_size, label=label)
    return image, caption


def jpeg(image: Image.Image, quality: int, subsampling: int = 0) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def near_duplicate(image: Image.Image, rng: random.Random, jpeg_subsampling: int = 0) -> tuple[str, bytes, str]:
    """A resized or JPEG re-encoded copy: (field, bytes, what was done)."""
    if rng.random() < 0.5:
        quality = rng.randint(*DUP_JPEG_QUALITY)
        return "jpg", jpeg(image, quality, jpeg_subsampling), f"jpeg q{quality} {JPEG_SUBSAMPLING[jpeg_subsampling]}"
    factor = rng.uniform(*rng.choice(DUP_FACTORS))
    side = round(image.width * factor)
    return "png", encode_png(image.resize((side, side), Image.Resampling.BICUBIC)), f"resize x{factor:.3f}"


def pad_to_aspect(image: Image.Image, rng: random.Random) -> Image.Image:
    """The image on a long strip of its background colour (the corner pixel), across or upright."""
    side = image.width
    long = round(side * rng.uniform(*EXTREME_ASPECTS))
    across = rng.random() < 0.5
    canvas = Image.new("RGB", (long, side) if across else (side, long), image.getpixel((0, 0)))
    offset = rng.randrange(long - side + 1)
    canvas.paste(image, (offset, 0) if across else (0, offset))
    return canvas


def build_sample(i: int, plan: NoisePlan, seed: int, image_size: int, per_shard: int,
                 jpeg_subsampling: int = 0) -> tuple[dict, dict]:
    """Training sample i -> (its shard fields, its truth line)."""
    kind, cls = plan.kinds[i], plan.classes[i]
    rng = random.Random(f"{seed}-edit-{i}")  # the sample's own edits: the same whatever came before
    truth = {"key": f"{i:08d}", "shard": SHARD_PATTERN % (i // per_shard), "kind": kind, "class": cls,
             "caption_class": cls, "original": None, "edit": None}
    if kind == "near_dup":
        original = plan.partner[i]
        cls = truth["class"] = truth["caption_class"] = plan.classes[original]
        image, caption = render_scene(seed, original, image_size, cls)
        field, data, truth["edit"] = near_duplicate(image, rng, jpeg_subsampling)
        if rng.random() < 0.5:
            caption = rng.choice(PARAPHRASES).format(caption)
            truth["edit"] += ", paraphrased"
        truth["original"] = f"{original:08d}"
        return {field: data, "txt": caption}, truth
    image, caption = render_scene(seed, i, image_size, cls)
    if kind == "swapped":
        donor = plan.partner[i]
        _, caption = render_scene(seed, donor, image_size, plan.classes[donor])
        truth["caption_class"] = plan.classes[donor]
    elif kind == "tiny":
        side = rng.randint(*tiny_sides(image_size))
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    elif kind == "extreme_aspect":
        image = pad_to_aspect(image, rng)
    return {"png": encode_png(image), "txt": caption}, truth


# ---------------------------------------------------------------- writing

def write_noisy_train(out: Path, plan: NoisePlan, seed: int, image_size: int, per_shard: int,
                      jpeg_subsampling: int = 0) -> list[str]:
    """The training shards under `out` and truth.jsonl beside them (`out`'s parent); returns the shard names.
    The shards are written under temporary names and renamed once all are complete."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(str(out))
    captions = set()
    truth_path = out.parent / "truth.jsonl"
    truth_tmp = truth_path.with_name(".truth.jsonl.tmp")
    # the curation tools' writer: temp names renamed once all are written, every member's mtime fixed (identical
    # re-runs), names shard-NNNNNN.tar as the truth lines give them
    with ShardWriter(out, max_count=per_shard) as sink, open(truth_tmp, "w") as truth_file:
        for i in tqdm(range(len(plan.kinds)), desc="noisy train shards", unit="img", mininterval=2):
            fields, truth = build_sample(i, plan, seed, image_size, per_shard, jpeg_subsampling)
            sink.write({"__key__": truth["key"], **fields, "txt": fields["txt"].encode("utf-8")})
            truth_file.write(json.dumps(truth) + "\n")
            captions.add(fields["txt"])
    shards = [p.name for p in sink.paths]
    check_prompts_unseen(captions)
    os.replace(truth_tmp, truth_path)
    return shards


def write_noisy_clip(output: str | Path, n: int = 40000, seed: int = 0, image_size: int = 32, per_shard: int = 2500,
                     val: int = 1000, zeroshot_per_class: int = 20, swapped: float = 0.3, near_dup: float = 0.2,
                     tiny: float = 0.015, extreme_aspect: float = 0.015, jpeg_subsampling: int = 0) -> dict:
    """Write the noisy training split, the clean held-out splits, truth.jsonl and info.json; returns the info."""
    if n < 1 or per_shard < 1 or image_size < 8:
        raise ValueError(f"need n >= 1, per_shard >= 1 and image_size >= 8; got {n}, {per_shard}, {image_size}")
    if jpeg_subsampling not in JPEG_SUBSAMPLING:
        raise ValueError(f"jpeg_subsampling must be one of {JPEG_SUBSAMPLING} (PIL's values), got {jpeg_subsampling}")
    out = Path(output)
    fractions = {"swapped": swapped, "near_dup": near_dup, "tiny": tiny, "extreme_aspect": extreme_aspect}
    plan = plan_noise(n, per_shard, seed, fractions)  # fails on bad settings before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)  # until the new data is complete
    shards = write_noisy_train(out / "train", plan, seed, image_size, per_shard, jpeg_subsampling)
    n_zs = write_heldout_splits(out, val, zeroshot_per_class, image_size, per_shard, seed)
    info = {"train": n, "seed": seed, "image_size": image_size, "per_shard": per_shard, "shards": len(shards),
            "fractions": fractions, "counts": count_kinds(n, fractions), "val": val, "zeroshot": n_zs,
            "classes": len(class_names()), "filter_min_side": filter_min_side(image_size),
            "filter_max_aspect": MAX_ASPECT, "tiny_sides": list(tiny_sides(image_size)),
            "extreme_aspects": list(EXTREME_ASPECTS), "dup_factors": [list(f) for f in DUP_FACTORS],
            "dup_jpeg_quality": list(DUP_JPEG_QUALITY), "dup_jpeg_chroma": JPEG_SUBSAMPLING[jpeg_subsampling]}
    tmp = out / ".info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / "info.json")
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_tools.synthetic_noisy_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--output", default="data/clip_noisy", help="folder for train/, val/, zeroshot/, truth.jsonl")
    p.add_argument("--n", type=int, default=40000, help="training samples, noise included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=32, help="side of the rendered images, in pixels")
    p.add_argument("--per_shard", type=int, default=2500, help="samples per shard")
    p.add_argument("--val", type=int, default=1000, help="held-out image-caption pairs")
    p.add_argument("--zeroshot_per_class", type=int, default=20, help="held-out labelled images per class")
    for kind, default in (("swapped", 0.3), ("near_dup", 0.2), ("tiny", 0.015), ("extreme_aspect", 0.015)):
        p.add_argument(f"--{kind}", type=float, default=default, help=f"fraction of {kind} samples")
    p.add_argument("--jpeg_subsampling", type=int, default=0, choices=sorted(JPEG_SUBSAMPLING),
                   help="chroma subsampling of JPEG copies (PIL): 0 = 4:4:4, 2 = 4:2:0 (far harder to dedup at 32 px)")
    a = p.parse_args(argv)
    try:
        info = write_noisy_clip(a.output, a.n, a.seed, a.image_size, a.per_shard, a.val, a.zeroshot_per_class,
                                a.swapped, a.near_dup, a.tiny, a.extreme_aspect, a.jpeg_subsampling)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
