"""data_tools.inspect: counts and distributions on crafted shards (a corrupt image, a missing caption, a shard cut
short, a corrupt clip), the report's files, escaping, audio players, flat memory, and the page in Chromium."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from data_tools.inspect import Histogram, ReportError, inspect_shards, main, reservoir_slot
from tests.helpers import ROOT, SUBPROCESS_ENV, chromium_or_skip, launch_chromium, png_bytes, write_tar

HOSTILE = "<script>window.__pwned = 1</script> hello"


def image_bytes(size: tuple[int, int], fmt: str = "PNG", colour=(30, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def cut_inside_member(path: Path, member: int) -> None:
    """Truncate a tar shard 10 bytes into the data of its `member`-th file: the shard ends mid-sample."""
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member].offset_data
    path.write_bytes(path.read_bytes()[:offset + 10])


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """shard-000000: 3 good pairs (one with a <script> caption), a corrupt image, an image with no caption, a
    caption with no image. shard-000001: 4 pairs of 32x32, cut short inside the 4th (3 come through)."""
    root = tmp_path_factory.mktemp("image_shards")
    write_tar(root / "shard-000000.tar", [
        {"__key__": "a", "png": image_bytes((16, 16)), "txt": "one red square"},
        {"__key__": "b", "jpg": image_bytes((40, 20), "JPEG"), "txt": "a wide blue picture of things"},
        {"__key__": "c", "png": image_bytes((24, 24)), "txt": HOSTILE},
        {"__key__": "d", "png": b"not an image at all", "txt": "broken image here"},
        {"__key__": "e", "png": image_bytes((16, 16))},
        {"__key__": "f", "txt": "orphan caption"},
    ])
    cut = write_tar(root / "shard-000001.tar", [
        {"__key__": f"t{i}", "png": png_bytes(size=32), "txt": f"caption number {i}"} for i in range(4)])
    cut_inside_member(cut, 6)  # the 4th sample's png
    return root


@pytest.fixture(scope="module")
def image_report(image_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reports") / "images"
    return out, inspect_shards(str(image_shards), out, per_shard=8, seed=0)


def test_counts_bad_samples_by_kind_and_the_shard_cut_short(image_report):
    _, stats = image_report
    assert stats["shards"] == 2 and stats["samples"] == 9 and stats["bad_samples"] == 3
    assert stats["bad"] == {"undecodable_image": 1, "undecodable_audio": 0, "audio_too_long": 0, "missing_text": 1,
                            "missing_media": 1, "bad_json": 0, "bad_shards": 1}
    per_shard = [(s["samples"], s["bad_samples"], s["bad_shard"]) for s in stats["per_shard"]]
    assert per_shard == [(6, 3, False), (3, 0, True)]
    assert {(e["key"], e["kind"]) for e in stats["bad_examples"]} == {("d", "undecodable_image"), ("e", "missing_text"),
                                                                     ("f", "missing_media")}


def test_distributions_summarise_what_decoded(image_report):
    _, stats = image_report
    dist = stats["distributions"]
    # widths of a, b, c, e and the three 32-px images; heights likewise
    assert dist["image_width"] == {"count": 7, "min": 16, "max": 40, "p5": 16, "p50": 32, "p95": 40,
                                   "mean": round((16 + 40 + 24 + 16 + 3 * 32) / 7, 3)}
    assert (dist["image_height"]["min"], dist["image_height"]["max"]) == (16, 32)
    assert dist["image_aspect"]["max"] == 2.0
    # captions of a, b, c, d, f and the three "caption number i"
    assert dist["caption_words"] == {"count": 8, "min": 2, "max": 6, "p5": 2, "p50": 3, "p95": 6,
                                     "mean": round((3 + 6 + 4 + 3 + 2 + 3 * 3) / 8, 3)}
    assert "audio_duration" not in dist and stats["languages"] == {}


def test_writes_the_report_files_and_only_the_histograms_that_apply(image_report):
    out, stats = image_report
    assert stats["histograms"] == ["image_size.png", "caption_length.png"]
    for name in ("stats.json", "samples.json", "index.html", "image_size.png", "caption_length.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "audio_duration.png").exists() and not (out / "language.png").exists()
    assert json.loads((out / "stats.json").read_text()) == stats
    with Image.open(out / "image_size.png") as im:
        assert im.format == "PNG" and im.width > 200
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_samples_json_lists_every_showable_sample_with_its_media(image_report):
    out, _ = image_report
    shards = json.loads((out / "samples.json").read_text())["shards"]
    shown = [[s["key"] for s in shard["samples_shown"]] for shard in shards]
    assert shown == [["a", "b", "c", "e"], ["t0", "t1", "t2"]]  # under 8 per shard: all, in shard order
    first = shards[0]["samples_shown"]
    assert first[2]["text"] == HOSTILE and first[3]["text"] is None and first[1]["width"] == 40
    for sample in first:
        with Image.open(out / sample["image"]) as im:
            assert im.size == (sample["width"], sample["height"])


def test_html_escapes_captions(image_report):
    out, _ = image_report
    page = (out / "index.html").read_text()
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt; hello" in page
    assert "<script" not in page  # not the caption's, and no script of our own
    assert page.count("<figure") == 7 and "(no text)" in page


def test_picks_are_a_seeded_reservoir(image_shards, tmp_path):
    def shown(seed, name):
        inspect_shards(str(image_shards), tmp_path / name, per_shard=2, seed=seed)
        return [[s["key"] for s in shard["samples_shown"]]
                for shard in json.loads((tmp_path / name / "samples.json").read_text())["shards"]]

    first = shown(0, "one")
    assert first == shown(0, "two") and [len(keys) for keys in first] == [2, 2]
    others = [shown(seed, f"s{seed}") for seed in (1, 2)]
    assert any(other != first for other in others)
    assert {k for picks in [first, *others] for k in picks[0]} <= {"a", "b", "c", "e"}  # never d or f: not showable


def test_reservoir_keeps_each_item_with_probability_k_over_n():
    rng, n, k, trials = random.Random(0), 20, 5, 4000
    kept = Counter()
    for _ in range(trials):
        reservoir: list[int] = []
        for i in range(n):
            slot = reservoir_slot(rng, i, k)
            if slot == len(reservoir):
                reservoir.append(i)
            elif slot is not None:
                reservoir[slot] = i
        kept.update(reservoir)
    assert all(abs(kept[i] / trials - k / n) < 0.04 for i in range(n)), kept


def test_histogram_bins_values_and_summarises():
    h = Histogram(0.1)
    for v in (0.52, 1.02, 1.04, 2.98):
        h.add(v)
    assert len(h.bins) == 3 and h.values_and_counts()[1] == [1, 2, 1]
    assert h.summary() == {"count": 4, "min": 0.5, "max": 3.0, "p5": 0.5, "p50": 1.0, "p95": 3.0, "mean": 1.39}
    assert Histogram().summary() == {"count": 0}


# ---------------------------------------------------------------- speech shards

def flac_bytes(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


def asr_json(text: str, language: str, seconds: float) -> bytes:
    return json.dumps({"text": text, "language": language, "duration": seconds}).encode()


@pytest.fixture(scope="module")
def asr_report(tmp_path_factory) -> tuple[Path, dict]:
    """write_asr_shards' layout: flac + json. Three clips of 0.5, 1 and 1.5 s, and one corrupt."""
    root = tmp_path_factory.mktemp("asr_shards")
    write_tar(root / "shard-000000.tar", [
        {"__key__": "000000", "flac": flac_bytes(0.5), "json": asr_json("hello there", "en", 0.5)},
        {"__key__": "000001", "flac": flac_bytes(1.0), "json": asr_json("guten tag", "de", 1.0)},
        {"__key__": "000002", "flac": flac_bytes(1.5), "json": asr_json("good <b>morning</b> to you", "en", 1.5)},
        {"__key__": "000003", "flac": b"fLaC but nothing after", "json": asr_json("bonjour", "fr", 1.0)},
    ])
    out = tmp_path_factory.mktemp("reports") / "asr"
    return out, inspect_shards(f"{root}/shard-{{000000..000000}}.tar", out, per_shard=8)


def test_speech_shards_get_durations_languages_and_audio_players(asr_report):
    out, stats = asr_report
    assert stats["samples"] == 4 and stats["bad"]["undecodable_audio"] == 1 and stats["bad_samples"] == 1
    assert stats["distributions"]["audio_duration"] == {"count": 3, "min": 0.5, "max": 1.5, "p5": 0.5, "p50": 1.0,
                                                        "p95": 1.5, "mean": 1.0}
    assert stats["languages"] == {"en": 2, "de": 1, "fr": 1}
    assert stats["histograms"] == ["caption_length.png", "audio_duration.png", "language.png"]
    page = (out / "index.html").read_text()
    assert page.count("<audio controls") == 3 and "<img src=\"media/" not in page
    assert "good &lt;b&gt;morning&lt;/b&gt; to you" in page
    shown = json.loads((out / "samples.json").read_text())["shards"][0]["samples_shown"]
    for sample, seconds in zip(shown, (0.5, 1.0, 1.5)):
        assert f"src=\"{sample['audio']}\"" in page and sample["duration"] == seconds
        assert soundfile.info(str(out / sample["audio"])).duration == pytest.approx(seconds)


# ---------------------------------------------------------------- command line and output folder

def test_cli_reads_brace_pipe_and_joined_specs_and_replaces_an_earlier_report(image_shards, tmp_path, capsys):
    out = tmp_path / "report"
    main([f"{image_shards}/shard-{{000000..000001}}.tar", "--output", str(out), "--per_shard=1"])
    assert "9 samples in 2 shards, 3 bad samples" in capsys.readouterr().out
    assert len(list((out / "media").iterdir())) == 2
    main([f"pipe:cat {image_shards}/shard-000000.tar::{image_shards}/shard-000000.tar", f"--output={out}"])
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["shards"], stats["samples"]) == (2, 12)
    assert len(list((out / "media").iterdir())) == 8  # 4 of each; the earlier report's media are gone


def test_refuses_an_output_that_is_not_a_report_and_loses_nothing(image_shards, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not an earlier report"):
        inspect_shards(str(image_shards), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and [p.name for p in tmp_path.iterdir()] == ["precious"]
    with pytest.raises(SystemExit, match="matches no shards|missing or empty"):
        main([str(tmp_path / "nothing-{0..1}.tar"), "--output", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_refuses_to_replace_an_earlier_report_that_holds_an_input_shard(image_shards, tmp_path):
    """Replacing the output folder removes what is in it: never a shard being read."""
    out = tmp_path / "report"
    inspect_shards(str(image_shards / "shard-000000.tar"), out, per_shard=1)
    shard = out / "shard-000000.tar"
    shard.write_bytes((image_shards / "shard-000000.tar").read_bytes())
    for spec in (str(shard), str(out), f"pipe:cat {image_shards}/shard-000001.tar::{shard}"):
        with pytest.raises(ReportError, match="holds input shard"):
            inspect_shards(spec, out)
    assert shard.read_bytes() == (image_shards / "shard-000000.tar").read_bytes()


def test_memory_stays_flat_with_ten_times_the_samples(tmp_path):
    """One process inspects 20 noise images (256 px, 200 kB of PNG each), then 200: its peak RSS grows by less
    than 16 MB. Keeping each sample's bytes or decoded image would add 40-80 MB."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    for name, shards in (("x1", 1), ("x10", 10)):
        (tmp_path / name).mkdir()
        for s in range(shards):
            write_tar(tmp_path / name / f"shard-{s:06d}.tar",
                      [{"__key__": f"{s}-{i}", "png": buf.getvalue(), "txt": f"noise {i}"} for i in range(20)])
    code = ("import resource, sys; from data_tools.inspect import inspect_shards\n"
            "def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"  # kB, the high-water mark
            "inspect_shards(sys.argv[1] + '/x1', sys.argv[1] + '/r1', per_shard=2); one = peak()\n"
            "inspect_shards(sys.argv[1] + '/x10', sys.argv[1] + '/r10', per_shard=2); print(one, peak())")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, ten = map(int, proc.stdout.split()[-2:])
    assert json.loads((tmp_path / "r10" / "stats.json").read_text())["samples"] == 200
    assert ten - one < 16 * 1024, f"peak RSS {one} kB after 1x, {ten} kB after 10x"


# ---------------------------------------------------------------- in a browser

def test_in_a_browser_the_report_shows_its_images_and_no_caption_runs(image_report, tmp_path):
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    out, _ = image_report
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)  # a hang guard, not a speed limit
            page.goto((out / "index.html").as_uri(), wait_until="load")
            widths = page.evaluate("Array.from(document.images, img => img.complete ? img.naturalWidth : 0)")
            pwned = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            shown_caption = page.locator("figure", has_text="hello").inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) == 2 + 7 and all(w > 0 for w in widths), widths  # 2 histograms, 7 samples
    assert pwned is None and "<script>window.__pwned = 1</script> hello" in shown_caption  # shown as text
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.format == "PNG" and shot.height > 400
    assert (tmp_path / "report.png").stat().st_size > 1000
