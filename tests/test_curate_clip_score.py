"""CLIP-score filtering: the threshold and top-k% rules on scores a crafted embedder sets exactly, corrupt and
caption-less samples counted, and a real tiny CLIP (trained by the recipe) scoring true captions above swapped ones,
end to end through the command line."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from data_tools.curate import clip_score
from data_tools.curate.clip_score import ClipScoreConfig, find_cut, top_count
from data_tools.curate.report import Report
from data_tools.curate.step_stats import ScoreStats
from tests.curate_fixtures import image_bytes, keys, pair, read_output, read_report, step_report, write_shards


class ScoreByRed:
    """A crafted embedder: an image's red value R gives the pair the CLIP score (R - 100) / 100 with any caption."""

    def embed_images(self, images):
        s = np.array([(im.getpixel((0, 0))[0] - 100) / 100 for im in images], np.float32)
        return np.stack([s, np.sqrt(1 - s ** 2), np.zeros_like(s)], axis=1)

    def embed_texts(self, texts):
        return np.tile(np.array([[1, 0, 0]], np.float32), (len(texts), 1))


def scored_pairs(scores: list[float]) -> list[dict]:
    """One sample per score, keys 000000..., a lossless image that ScoreByRed scores exactly so."""
    return [pair(f"{i:06d}", image_bytes((100 + round(s * 100), 0, 0)), f"caption {i}") for i, s in enumerate(scores)]


def run(samples, **cfg) -> tuple[list[dict], Report]:
    report = Report("clip_score")
    kept = list(clip_score.apply(samples, ClipScoreConfig(batch_size=3, **cfg), report, embedder=ScoreByRed()))
    assert report.n_in == report.n_out + sum(report.drops.values()) == len(samples)
    return kept, report


SCORES = [0.10, 0.40, 0.25, 0.24, 0.90, 0.30, 0.30, 0.05, 0.30, 0.60]


def test_threshold_keeps_exactly_the_pairs_at_or_above_it_in_input_order():
    kept, report = run(scored_pairs(SCORES), threshold=0.25)
    assert keys(kept) == ["000001", "000002", "000004", "000005", "000006", "000008", "000009"]
    assert report.drops == {"low_clip_score": 3}
    d = report.to_dict()
    assert d["examples"]["low_clip_score"][0] == {"key": "000000", "url": None,
                                                  "detail": "score 0.1000 < threshold 0.25"}
    score = d["stats"]["score"]
    assert score["n"] == 10 and score["max"] == 0.9 and score["min"] == 0.05
    assert score["percentiles"]["p50"] == pytest.approx(0.30, abs=6e-4)


@pytest.mark.parametrize("percent, expected", [
    (30, ["000004", "000009", "000001"]),                       # ceil(3.0) = 3: the three best
    (50, ["000001", "000004", "000005", "000006", "000009"]),   # 5: two of the three 0.30 ties, the earlier ones
    (25, ["000001", "000004", "000009"]),                       # ceil(2.5) = 3
    (100, [f"{i:06d}" for i in range(10)]),
])
def test_top_percent_keeps_ceil_n_times_percent_with_ties_going_to_the_earlier(percent, expected, tmp_path):
    kept, report = run(scored_pairs(SCORES), top_percent=percent, tmp_dir=str(tmp_path / "spill"))
    assert sorted(keys(kept)) == sorted(expected)
    assert keys(kept) == sorted(keys(kept))  # input order
    assert report.n_out == top_count(10, percent)
    assert list((tmp_path / "spill").iterdir()) == []  # the spill is removed


def test_kept_samples_pass_on_byte_identical():
    samples = scored_pairs(SCORES)
    kept, _ = run(samples, top_percent=50)
    by_key = {s["__key__"]: s for s in samples}
    assert all(s == by_key[s["__key__"]] for s in kept)


def test_corrupt_images_and_missing_captions_are_counted_not_fatal():
    samples = scored_pairs([0.5, 0.5, 0.5])
    samples[0]["png"] = b"\x89PNG\r\n\x1a\n not really"
    del samples[1]["txt"]
    samples.append({"__key__": "no-image", "txt": b"a caption"})
    kept, report = run(samples, threshold=0.0)
    assert keys(kept) == ["000002"]
    assert report.drops == {"corrupt": 1, "no_caption": 1, "no_image": 1}


def test_count_and_cut_arithmetic():
    assert [top_count(10, p) for p in (29, 30, 31, 0.01, 100)] == [3, 3, 4, 1, 10]
    assert top_count(100, 29) == 29  # 100 * 29 / 100 is 29.000000000000004 in floats
    cut, ties = find_cut(np.array([0.3, 0.1, 0.3, 0.3, 0.2], np.float32), 2)
    assert (cut, ties) == (pytest.approx(0.3), 2)
    assert find_cut(np.zeros(0, np.float32), 0) == (math.inf, 0)


def test_score_stats_percentiles_within_half_a_bin():
    stats = ScoreStats()
    values = np.random.default_rng(0).uniform(-0.2, 0.6, 5000)
    for v in values:
        stats.add(float(v))
    for q in (1, 30, 50, 99):
        assert stats.percentile(q) == pytest.approx(np.percentile(values, q), abs=2e-3)


@pytest.mark.parametrize("cfg, words", [
    ({}, "exactly one of threshold"),
    ({"threshold": 0.2, "top_percent": 30}, "exactly one of threshold"),
    ({"top_percent": 0}, "top_percent must be in (0, 100]"),
    ({"top_percent": 101}, "top_percent must be in (0, 100]"),
])
def test_bad_settings_fail_before_reading_anything(cfg, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        next(clip_score.apply(iter([]), ClipScoreConfig(**cfg), Report("clip_score"), embedder=ScoreByRed()))


# ---------------------------------------------------------------- a real CLIP

def shape_pairs(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(n true pairs, the same n images with captions rotated by one: each caption describes another image)."""
    from tests.zeroshot_fixtures import render_shapes

    rendered = render_shapes(n, seed)
    buf = []
    for img, _ in rendered:
        b = io.BytesIO()
        img.save(b, format="PNG")
        buf.append(b.getvalue())
    true = [pair(f"true{i:03d}", buf[i], label) for i, (_, label) in enumerate(rendered)]
    swapped = [pair(f"swap{i:03d}", buf[i], rendered[(i + 1) % n][1]) for i in range(n)]
    return true, swapped


def test_trained_tiny_clip_scores_true_captions_above_swapped_ones(trained_clip):
    from data_tools.curate.embed import load_clip_embedder

    true, swapped = shape_pairs(24, seed=5)
    emb = load_clip_embedder(str(trained_clip / "export"), device="cpu", batch_size=8)
    images = [Image.open(io.BytesIO(s["png"])) for s in true]
    img = emb.embed_images(images)
    assert img.dtype == np.float32 and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    true_scores = (img * emb.embed_texts([s["txt"].decode() for s in true])).sum(1)
    swap_scores = (img * emb.embed_texts([s["txt"].decode() for s in swapped])).sum(1)
    assert true_scores.mean() > swap_scores.mean() + 0.05
    assert (true_scores > swap_scores).mean() >= 0.75


def test_command_line_top_percent_drops_mostly_swapped_pairs(trained_clip, tmp_path):
    true, swapped = shape_pairs(20, seed=6)
    write_shards(tmp_path / "in", [s for pair_ in zip(true, swapped) for s in pair_], per_shard=16)
    assert clip_score.main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}", f"--checkpoint={trained_clip}",
                            "--top_percent=50", "--batch_size=16", "--device=cpu"]) == 0
    kept = read_output(tmp_path / "out")
    assert len(kept) == 20
    assert sum(k.startswith("true") for k in keys(kept)) >= 15
    step = step_report(read_report(tmp_path / "out"), "clip_score")
    assert (step["n_in"], step["n_out"], step["drops"]) == (40, 20, {"low_clip_score": 20})
    assert set(step["stats"]["score"]["percentiles"]) >= {"p10", "p50", "p90"}
    by_key = {s["__key__"]: s for s in true + swapped}
    assert all(s == by_key[s["__key__"]] for s in kept)  # byte-identical copies


def test_command_line_names_a_missing_checkpoint(tmp_path, capsys):
    write_shards(tmp_path / "in", scored_pairs([0.5]))
    assert clip_score.main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}", f"--checkpoint={tmp_path / 'nope'}",
                            "--threshold=0.2"]) == 2
    assert f"checkpoint={tmp_path / 'nope'}: no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_open_clip_name_with_local_weights_and_refusals(tmp_path):
    from safetensors.torch import save_file

    from data_tools.curate.embed import load_clip_embedder
    from mm.clip.model import create_clip

    weights = tmp_path / "micro.safetensors"
    save_file(create_clip("mm-test-micro").model.state_dict(), str(weights))
    emb = load_clip_embedder("open_clip:mm-test-micro", str(weights), device="cpu", batch_size=2)
    out = emb.embed_texts(["a", "b", "c"])
    assert out.shape == (3, emb.dim) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="needs pretrained"):
        load_clip_embedder("open_clip:mm-test-micro")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_clip_embedder("open_clip:ViT-B-32", "openai")
    with pytest.raises(ValueError, match="only goes with checkpoint=open_clip"):
        load_clip_embedder(str(tmp_path), str(weights))
    with pytest.raises(FileNotFoundError, match="no export"):
        load_clip_embedder(str(tmp_path))
