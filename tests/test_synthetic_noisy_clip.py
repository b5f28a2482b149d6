"""data_tools.synthetic_noisy_clip: the injected faults are there in the stated fractions, truth.jsonl tells the
truth about the shards, and a seed gives the same data."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from data_tools.synthetic_clip import class_names
from data_tools.synthetic_noisy_clip import main, write_noisy_clip
from mm.shards import expand_shard_spec, read_samples

N, PER_SHARD = 400, 100
SMALL = {"n": N, "per_shard": PER_SHARD, "val": 8, "zeroshot_per_class": 1}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy")
    write_noisy_clip(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def data(noisy) -> tuple[list[dict], dict[str, dict], dict]:
    """(truth lines, raw train samples by key, info.json)"""
    truth = [json.loads(line) for line in (noisy / "truth.jsonl").read_text().splitlines()]
    counts = {"bad_shards": 0}
    samples = {}
    for raw in read_samples(expand_shard_spec(str(noisy / "train"))[0].urls, counts):
        samples[raw["__key__"]] = {**raw, "shard": Path(raw["__url__"]).name}
    assert counts["bad_shards"] == 0
    return truth, samples, json.loads((noisy / "info.json").read_text())


def image_of(sample: dict) -> Image.Image:
    return Image.open(io.BytesIO(sample.get("png") or sample["jpg"])).convert("RGB")


def pixels(sample: dict, side: int = 32) -> np.ndarray:
    return np.asarray(image_of(sample).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def test_kinds_come_in_the_stated_fractions(data):
    truth, _, info = data
    kinds = [t["kind"] for t in truth]
    for kind, fraction in {"swapped": 0.3, "near_dup": 0.2, "tiny": 0.015, "extreme_aspect": 0.015}.items():
        assert abs(kinds.count(kind) / N - fraction) <= 0.005, kind
    assert kinds.count("clean") == N - sum(info["counts"][k] for k in info["counts"] if k != "clean")
    assert info["counts"] == {k: kinds.count(k) for k in info["counts"]} and info["shards"] == N // PER_SHARD


def test_truth_matches_the_shards(data):
    truth, samples, _ = data
    assert [t["key"] for t in truth] == sorted(samples) and len(samples) == N
    for t in truth:
        assert samples[t["key"]]["shard"] == t["shard"] and t["class"] in class_names()


def test_image_sizes_fall_on_either_side_of_the_filter_thresholds(data):
    truth, samples, info = data
    min_side, max_aspect = info["filter_min_side"], info["filter_max_aspect"]
    assert (min_side, max_aspect) == (24, 3.0)
    for t in truth:
        w, h = image_of(samples[t["key"]]).size
        if t["kind"] == "tiny":
            assert w == h and 8 <= w <= 16 < min_side
        elif t["kind"] == "extreme_aspect":
            assert min(w, h) == 32 and 3.5 <= max(w, h) / min(w, h) <= 5
        else:  # what a basic filter must keep
            assert min(w, h) >= min_side and max(w, h) / min(w, h) <= max_aspect
            assert (w, h) == (32, 32) or t["kind"] == "near_dup"


def test_swapped_captions_name_another_class(data):
    truth, samples, _ = data
    swapped = [t for t in truth if t["kind"] == "swapped"]
    for t in truth:
        caption = samples[t["key"]]["txt"].decode()
        colour, shape = t["caption_class"].split()
        assert colour in caption and shape in caption, (t, caption)
        assert (t["caption_class"] != t["class"]) == (t["kind"] == "swapped")
    assert len({t["caption_class"] for t in swapped}) > 10  # from all over the classes, not one donor


def test_near_duplicates_copy_a_clean_original_in_another_shard(data):
    truth, samples, _ = data
    by_key = {t["key"]: t for t in truth}
    dups = [t for t in truth if t["kind"] == "near_dup"]
    originals = [by_key[t["original"]] for t in dups]
    assert all(o["kind"] == "clean" and o["shard"] != d["shard"] and o["class"] == d["class"]
               for d, o in zip(dups, originals))
    assert len({o["key"] for o in originals}) == len(dups)  # groups of two: one copy of each original
    others = [t["key"] for t in truth if t["kind"] != "near_dup"]
    candidates = np.stack([pixels(samples[k]) for k in others])
    for d, o in zip(dups, originals):
        distance = np.abs(candidates - pixels(samples[d["key"]])).mean(axis=(1, 2, 3))
        assert others[int(distance.argmin())] == o["key"] and distance.min() < 12, d  # its original, and close
        caption, original_caption = samples[d["key"]]["txt"].decode(), samples[o["key"]]["txt"].decode()
        assert caption == original_caption if "paraphrased" not in d["edit"] else \
            original_caption in caption and caption != original_caption
    edits = [d["edit"].split()[0] for d in dups]
    assert 0.3 < edits.count("jpeg") / len(dups) < 0.7 and edits.count("jpeg") + edits.count("resize") == len(dups)
    assert all(("jpg" in samples[d["key"]]) == d["edit"].startswith("jpeg") for d in dups)


def jpeg_chroma(truth: list[dict], samples: dict[str, dict]) -> set[int]:
    """PIL's subsampling code (0 = 4:4:4, 2 = 4:2:0) of every JPEG copy."""
    return {JpegImagePlugin.get_sampling(Image.open(io.BytesIO(samples[t["key"]]["jpg"])))
            for t in truth if t["edit"] and t["edit"].startswith("jpeg")}


def test_jpeg_copies_keep_full_chroma_unless_asked(data, tmp_path):
    truth, samples, info = data
    assert jpeg_chroma(truth, samples) == {0} and info["dup_jpeg_chroma"] == "4:4:4"
    assert all("4:4:4" in t["edit"] for t in truth if t["edit"] and t["edit"].startswith("jpeg"))
    write_noisy_clip(tmp_path / "harsh", seed=0, jpeg_subsampling=2, **SMALL)
    harsh = [json.loads(line) for line in (tmp_path / "harsh" / "truth.jsonl").read_text().splitlines()]
    counts = {"bad_shards": 0}
    raw = {s["__key__"]: s for s in read_samples(expand_shard_spec(str(tmp_path / "harsh" / "train"))[0].urls, counts)}
    assert jpeg_chroma(harsh, raw) == {2}
    assert [t["kind"] for t in harsh] == [t["kind"] for t in truth]  # the same plan, only the encoding differs


def test_held_out_splits_and_info_are_written(noisy):
    for split in ("val", "zeroshot"):
        assert list((noisy / split).glob("shard-*.tar"))
    assert json.loads((noisy / "zeroshot" / "classnames.json").read_text()) == class_names()
    assert not list(noisy.rglob(".*.tmp"))  # every file renamed into place


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data(noisy, tmp_path):
    main([f"--output={tmp_path / 'again'}", f"--n={N}", f"--per_shard={PER_SHARD}", "--val=8",
          "--zeroshot_per_class=1", "--seed=0"])
    for name in ("truth.jsonl", *(f"train/shard-{s:06d}.tar" for s in range(N // PER_SHARD))):
        assert (tmp_path / "again" / name).read_bytes() == (noisy / name).read_bytes(), name
    write_noisy_clip(tmp_path / "other", seed=1, **SMALL)
    assert (tmp_path / "other" / "truth.jsonl").read_text() != (noisy / "truth.jsonl").read_text()


@pytest.mark.parametrize("settings, message", [
    ({"n": 50, "per_shard": 100}, "more than one shard"),
    ({"n": 400, "per_shard": 100, "swapped": 0.5, "near_dup": 0.3}, "cannot be the originals"),
    ({"n": 400, "per_shard": 100, "tiny": -0.1}, r"must be in \[0, 1\]"),
    ({"n": 400, "per_shard": 100, "jpeg_subsampling": 3}, "jpeg_subsampling must be one of"),
])
def test_bad_settings_fail_before_writing(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        write_noisy_clip(tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()
