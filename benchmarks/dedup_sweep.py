"""How near_bits and color_tolerance trade dedup precision for recall on the noisy CLIP data, and how far JPEG
re-encoding moves a 32-px copy from its original: the measurements behind benchmarks/curation_gain.yaml's dedup
settings and the generator's 4:4:4 JPEG copies (benchmarks/RESULTS.md, "Data curation").

    python benchmarks/dedup_sweep.py data/curation_gain/data --near_bits=8,10,12 --color_tolerance=2,2.5,3
    python benchmarks/dedup_sweep.py data/curation_gain/data --jpeg=1500     # + re-encode 1500 clean images

The sweep replays data_tools.curate.dedup's rule in memory, in the same order with the same fingerprints (its
pHash and 8x8 mean colours): a sample is dropped when a kept one is within near_bits and color_tolerance, matched
to the nearest such hash (first kept on ties), else kept. Each setting is scored as curation_gain.py scores the
real step (score_dedup). Quadratic in the kept set: for tuning on tens of thousands, not for curating.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.curation_gain import load_truth, score_dedup  # noqa: E402
from data_tools.curate.dedup import colour_thumbnail, perceptual_hash  # noqa: E402
from mm.shards import expand_shard_spec, read_samples  # noqa: E402

JPEG_QUALITIES = (60, 70, 75, 80, 85, 90)


def fingerprints(train: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Image.Image]]:
    """(keys in shard order, pHashes [N] uint64, thumbnails [N, 192] int16, the PNG images by key)."""
    keys, hashes, thumbs, pngs = [], [], [], {}
    counts = {"bad_shards": 0}
    for raw in read_samples(expand_shard_spec(str(train))[0].urls, counts):
        image = Image.open(io.BytesIO(raw.get("png") or raw["jpg"])).convert("RGB")
        keys.append(raw["__key__"])
        hashes.append(perceptual_hash(image))
        thumbs.append(np.frombuffer(colour_thumbnail(image), np.uint8))
        if "png" in raw:
            pngs[raw["__key__"]] = image
    return keys, np.array(hashes, np.uint64), np.stack(thumbs).astype(np.int16), pngs


def replay_dedup(keys: list[str], hashes: np.ndarray, thumbs: np.ndarray, near_bits: int,
                 tolerance: float) -> list[dict]:
    """The dedup step's drops ({"key", "reason", "detail"}) for these fingerprints, in order."""
    kept_h, kept_t, kept_keys, drops = np.zeros_like(hashes), np.zeros_like(thumbs), [], []
    for i, key in enumerate(keys):
        n = len(kept_keys)
        bits = np.bitwise_count(kept_h[:n] ^ hashes[i])
        near = np.nonzero(bits <= near_bits)[0]
        if len(near):
            near = near[np.abs(kept_t[near] - thumbs[i]).mean(axis=1) <= tolerance]
        if len(near):
            j = near[np.lexsort((near, bits[near]))[0]]  # nearest hash first, then the earliest kept
            drops.append({"key": key, "reason": "near_image", "detail": f"{bits[j]} bits from {kept_keys[j]}"})
            continue
        kept_h[n], kept_t[n] = hashes[i], thumbs[i]
        kept_keys.append(key)
    return drops


def jpeg_distances(images: dict[str, Image.Image], hashes: dict[str, int], thumbs: dict[str, np.ndarray],
                   near_bits: int, tolerance: float) -> list[str]:
    """Table rows: each JPEG quality and chroma subsampling -> how far the re-encoded copies move."""
    rows = ["| chroma | quality | pHash bits p95 | colour p50 | colour p95 | within both |", "| --- |" + " ---: |" * 5]
    for sub, chroma in ((2, "4:2:0"), (0, "4:4:4")):
        for quality in JPEG_QUALITIES:
            bits, colour = [], []
            for key, image in images.items():
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=quality, subsampling=sub)
                copy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
                bits.append((perceptual_hash(copy) ^ hashes[key]).bit_count())
                colour.append(np.abs(np.frombuffer(colour_thumbnail(copy), np.uint8) - thumbs[key]).mean())
            bits, colour = np.array(bits), np.array(colour)
            within = ((bits <= near_bits) & (colour <= tolerance)).mean()
            rows.append(f"| {chroma} | {quality} | {np.percentile(bits, 95):.0f} | {np.median(colour):.2f} | "
                        f"{np.percentile(colour, 95):.2f} | {within:.3f} |")
    return rows


def nearest_distinct_colour(keys, hashes, thumbs, truth, near_bits: int) -> np.ndarray:
    """Per image: the colour distance to the closest image within near_bits that is not in its injected group."""
    group = {k: t["original"] for k, t in truth.items() if t["kind"] == "near_dup"}
    group.update({o: o for o in list(group.values())})
    number = {name: n for n, name in enumerate(dict.fromkeys(group.get(k, k) for k in keys))}
    ids = np.array([number[group.get(k, k)] for k in keys])
    out = np.full(len(keys), np.inf)
    for i in range(len(keys)):
        near = np.nonzero((np.bitwise_count(hashes ^ hashes[i]) <= near_bits) & (ids != ids[i]))[0]
        if len(near):
            out[i] = np.abs(thumbs[near] - thumbs[i]).mean(axis=1).min()
    return out


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder written by data_tools.synthetic_noisy_clip (train/, truth.jsonl)")
    p.add_argument("--near_bits", type=floats, default=[8, 10, 12])
    p.add_argument("--color_tolerance", type=floats, default=[2.0, 2.5, 3.0])
    p.add_argument("--jpeg", type=int, default=0, help="also re-encode this many clean images at each setting")
    args = p.parse_args(argv)
    data = Path(args.data)
    truth = load_truth(data / "truth.jsonl")
    keys, hashes, thumbs, pngs = fingerprints(data / "train")
    print("| near_bits | color_tolerance | dropped | precision | recall |\n| ---: | ---: | ---: | ---: | ---: |")
    for bits in args.near_bits:
        for tol in args.color_tolerance:
            s = score_dedup(replay_dedup(keys, hashes, thumbs, int(bits), tol), truth)
            print(f"| {int(bits)} | {tol:g} | {s['dropped']} | {s['precision']} | {s['recall']} |", flush=True)
    if args.jpeg:
        bits, tol = int(args.near_bits[len(args.near_bits) // 2]), args.color_tolerance[len(args.color_tolerance) // 2]
        nearest = nearest_distinct_colour(keys, hashes, thumbs, truth, bits)
        print(f"\ndistinct images: colour distance to the nearest other image within {bits} bits, percentiles "
              f"1/5/10/50: {np.round(np.percentile(nearest, [1, 5, 10, 50]), 2).tolist()}")
        at = {k: i for i, k in enumerate(keys)}
        clean = [k for k in keys if truth[k]["kind"] == "clean" and k in pngs][:args.jpeg]
        rows = jpeg_distances({k: pngs[k] for k in clean}, {k: int(hashes[at[k]]) for k in clean},
                              {k: thumbs[at[k]] for k in clean}, bits, tol)
        print(f"\nJPEG copies of {len(clean)} clean images ('within both': {bits} bits and colour {tol:g}):")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
