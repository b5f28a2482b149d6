"""Dedup: exact (bytes, normalised text) and near (pHash + colour) duplicates, one kept per group, the chain case,
the on-disk multi-index against brute force with a 16 KiB cache, and flat memory as the input grows."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from data_tools.curate import dedup
from data_tools.curate.dedup import DedupConfig, NearIndex, normalise_text, open_index
from data_tools.curate.report import Report
from tests.curate_fixtures import (encode, image_bytes, keys, noise_image, noise_pairs, pair, read_report, speech,
                                   tone_flac, write_shards)
from tests.helpers import ROOT, SUBPROCESS_ENV


def run(samples, **cfg) -> tuple[list[dict], Report]:
    report = Report("dedup")
    kept = list(dedup.apply(samples, DedupConfig(**cfg), report))
    report.check()
    return kept, report


def reasons(report: Report) -> dict[str, list[str]]:
    return {r: [e["key"] for e in ex] for r, ex in report.to_dict()["examples"].items()}


def test_exact_duplicates_of_image_audio_and_text():
    red, blue = image_bytes((200, 30, 30)), image_bytes((30, 30, 200))
    flac = tone_flac(0.2)
    samples = [pair("a", red, "A red square!"), pair("b", red, "another caption"), pair("c", blue, "a  red, SQUARE"),
               speech("d", flac, "hello"), speech("e", flac, "a different transcript"),
               speech("f", tone_flac(0.3), "x")]
    kept, report = run(samples, near=False)
    assert keys(kept) == ["a", "c", "d", "f"]
    assert report.drops == {"exact_image": 1, "exact_audio": 1}
    assert report.to_dict()["examples"]["exact_image"][0]["detail"] == "same image as a"
    kept, report = run(samples, near=False, exact_text=True)
    assert keys(kept) == ["a", "d", "f"] and reasons(report) == {"exact_image": ["b"], "exact_text": ["c"],
                                                                   "exact_audio": ["e"]}
    kept, report = run(samples, near=False, exact_media=False)
    assert keys(kept) == keys(samples) and report.drops == {}


def test_normalise_text():
    assert normalise_text("  A red,\tCircle!! ") == "a red circle"
    assert normalise_text("Ｆｕｌｌ-width “quotes”") == "fullwidth quotes"
    assert normalise_text("...") == ""


def test_a_sample_dropped_for_its_text_leaves_no_image_behind():
    one, two = noise_pairs(2)
    samples = [pair("a", one["png"], "same words"), pair("b", two["png"], "Same words."),
               pair("c", two["png"], "other words")]  # c's image was only ever in b, which was dropped
    kept, report = run(samples, exact_text=True)
    assert keys(kept) == ["a", "c"] and reasons(report) == {"exact_text": ["b"]}


def near_variants(seed: int) -> list[bytes]:
    """A smooth random image and three near copies: resized down, resized up, JPEG re-encoded."""
    from PIL import Image

    img = noise_image(seed, size=8, block=1).resize((32, 32), Image.Resampling.BICUBIC)
    return [encode(img), encode(img, size=(24, 24)), encode(img, size=(48, 48)), encode(img, fmt="JPEG", quality=75)]


def test_near_duplicates_keep_exactly_one_per_group():
    samples = [pair(f"g{g}v{v}", data, f"group {g}") for g in range(6) for v, data in enumerate(near_variants(g))]
    random.Random(0).shuffle(samples)
    kept, report = run(samples)
    assert sorted(k[:2] for k in keys(kept)) == [f"g{g}" for g in range(6)]  # one of each group, the first seen
    first = {}
    for s in samples:
        first.setdefault(s["__key__"][:2], s["__key__"])
    assert sorted(keys(kept)) == sorted(first.values())
    assert report.drops == {"near_image": 18}
    for ex in report.to_dict()["examples"]["near_image"]:  # each names the kept member of its own group
        assert ex["detail"].split(" from ")[1].startswith(first[ex["key"][:2]])


def test_colour_check_tells_apart_images_that_share_a_phash():
    # flat images all hash to the same pHash (no structure): only the colour check tells red from blue
    flat = [pair("red", image_bytes((200, 30, 30)), "x"), pair("blue", image_bytes((30, 30, 200)), "y"),
            pair("red2", image_bytes((202, 31, 29), size=(40, 40)), "z")]
    kept, report = run(flat)
    assert keys(kept) == ["red", "blue"] and reasons(report) == {"near_image": ["red2"]}
    kept, _ = run(flat, color_tolerance=None)
    assert keys(kept) == ["red"]


def bits_image(h: int) -> bytes:
    """A 64 x 1 grey PNG whose pixels spell the 64 bits of h (read back by fake_hash)."""
    from PIL import Image

    img = Image.new("L", (64, 1))
    img.putdata([255 if (h >> (63 - i)) & 1 else 0 for i in range(64)])
    return encode(img)


def fake_hash(image, kind="phash") -> int:
    import numpy as np

    return int("".join("1" if p > 127 else "0" for p in np.asarray(image.convert("L")).flatten()), 2)


def test_chain_keeps_the_ends(monkeypatch):
    """a~b (6 bits), b~c (6 bits), a and c 12 bits apart: b goes, c stays, since it repeats nothing kept."""
    monkeypatch.setattr(dedup, "perceptual_hash", fake_hash)
    a = 0x0123456789ABCDEF
    b, c = a ^ 0b111111, a ^ 0b111111_111111
    d = a ^ 0b11  # a near copy of a too
    samples = [pair(k, bits_image(h), k) for k, h in (("a", a), ("b", b), ("c", c), ("d", d))]
    kept, report = run(samples, color_tolerance=None)
    assert keys(kept) == ["a", "c"]
    assert [(e["key"], e["detail"]) for e in report.to_dict()["examples"]["near_image"]] == [
        ("b", "6 bits from a"), ("d", "2 bits from a")]


def test_corrupt_image_is_reported_not_fatal():
    good = noise_pairs(2)
    samples = [good[0], pair("bad", image_bytes(fmt="JPEG")[:50], "cut short"), good[1]]
    kept, report = run(samples)
    assert keys(kept) == keys(good) and report.drops == {"corrupt": 1}
    assert reasons(report) == {"corrupt": ["bad"]}


@pytest.mark.parametrize("bands,near_bits", [(3, 8), (5, 8), (4, 10), (8, 7)])
def test_near_index_on_disk_matches_brute_force(tmp_path, bands, near_bits):
    """Many more hashes than a 16 KiB page cache holds; every search equals a brute-force scan."""
    rng = random.Random(bands)
    conn = open_index(tmp_path / "idx.sqlite", cache_kib=16)
    index = NearIndex(conn, bands)
    stored = []
    for i in range(3000):
        # clusters: a hash and copies 0-12 bits away, so searches find several at various distances
        flips = sum(1 << b for b in rng.sample(range(64), rng.randrange(13)))
        h = rng.getrandbits(64) if i % 4 == 0 else stored[-1] ^ flips
        stored.append(h)
        index.add(h, f"k{i}")
    conn.commit()
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -16
    assert (tmp_path / "idx.sqlite").stat().st_size > 10 * 16 * 1024  # the index is 10x its cache, and more
    queries = [rng.getrandbits(64) for _ in range(50)] + [h ^ (1 << rng.randrange(64)) for h in rng.sample(stored, 100)]
    for q in queries:
        want = sorted(((q ^ h).bit_count(), f"k{i}") for i, h in enumerate(stored) if (q ^ h).bit_count() <= near_bits)
        assert [(d, ref) for d, ref, _ in sorted(index.search(q, near_bits))] == want


def test_config_errors():
    with pytest.raises(ValueError, match="too few for --near_bits=20"):
        list(dedup.apply([], DedupConfig(bands=1, near_bits=20), Report("d")))
    with pytest.raises(ValueError, match="near_bits=64"):
        list(dedup.apply([], DedupConfig(near_bits=64), Report("d")))


# ---------------------------------------------------------------- memory stays flat

CHILD = """
import json, resource, sys
from data_tools.curate import dedup

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

peaks = []
for spec, out in zip(sys.argv[1::2], sys.argv[2::2]):  # the small input first: it also warms up imports and caches
    try:
        dedup.main([spec, f"--output={out}", "--cache_kib=64", "--bands=5"])  # 5 bands: fastest at this size
    except SystemExit as e:
        assert not e.code, e.code
    peaks.append(peak_kib())
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    """Dedup 400, then 4,000 distinct tiny samples in one fresh process: the peak RSS may grow by < 200 bytes per
    extra sample. (With a dict of digests and a list of hashes in place of the SQLite index it grew ~770 bytes per
    sample, 2.7 MB here.)"""
    write_shards(tmp_path / "in", noise_pairs(4000, size=8, block=1), per_shard=400)
    runs = [str(tmp_path / "in" / "shard-000000.tar"), str(tmp_path / "out400"), str(tmp_path / "in"),
            str(tmp_path / "out4000")]
    proc = subprocess.run([sys.executable, "-c", CHILD, *runs], cwd=ROOT, capture_output=True, text=True,
                          env={**SUBPROCESS_ENV, "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = json.loads(proc.stdout.strip().splitlines()[-1])
    assert read_report(tmp_path / "out4000")["steps"][1]["n_out"] > 3500  # most samples entered the index
    per_sample = (large - small) * 1024 / 3600
    assert per_sample < 200, f"peak RSS grew {large - small} KiB for 3600 more samples ({per_sample:.0f} B each)"
