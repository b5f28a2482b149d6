"""Filters: each rule on crafted samples (kept, dropped, reason code), the first failing rule recorded, corrupt
fields counted, every rule off by default, and bad settings refused with a message."""
from __future__ import annotations

import pytest

from data_tools.curate import filters
from data_tools.curate.filters import FiltersConfig, silence_ratio
from data_tools.curate.report import Report
from tests.curate_fixtures import image_bytes, keys, pair, speech, tone_flac


def run(samples, **cfg) -> tuple[list[str], dict[str, str]]:
    """(kept keys, {dropped key: reason})."""
    report = Report("filters")
    kept = list(filters.apply(samples, FiltersConfig(**cfg), report))
    report.check()
    dropped = {e["key"]: reason for reason, ex in report.to_dict()["examples"].items() for e in ex}
    assert len(dropped) == report.n_dropped  # every drop is named in the examples (fewer than 5 per reason here)
    return keys(kept), dropped


def captions(*texts: str) -> list[dict]:
    return [pair(f"c{i}", image_bytes(), t) for i, t in enumerate(texts)]


def test_caption_words_and_chars():
    samples = captions("a cat", "a red cat on mats", "one two three four five six", "x" * 40)
    assert run(samples, min_words=2, max_words=5) == (["c0", "c1"], {"c2": "caption_words", "c3": "caption_words"})
    assert run(samples, min_words=3) == (["c1", "c2"], {"c0": "caption_words", "c3": "caption_words"})
    assert run(samples, min_chars=6, max_chars=30) == (["c1", "c2"], {"c0": "caption_chars", "c3": "caption_chars"})


def test_blocklist_words_and_regexes():
    samples = captions("a photo, NSFW!", "nsfwx is a made-up word", "see https://example.com now", "fine caption")
    assert run(samples, blocklist=["nsfw", "two words"]) == (["c1", "c2", "c3"], {"c0": "blocklist"})
    assert run(samples, blocklist_regex=[r"https?://", r"^\d+$"]) == (["c0", "c1", "c3"], {"c2": "blocklist_regex"})


def test_language():
    samples = captions("a red circle on a white background", "ein roter Kreis auf einem weißen Hintergrund",
                       "un grand cercle rouge sur un fond blanc", "12345")
    kept, dropped = run(samples, languages=["en"], candidate_languages=["en", "de", "fr"])
    assert (kept, dropped) == (["c0"], {"c1": "language", "c2": "language", "c3": "language"})
    kept, dropped = run(samples[:3], languages=["en", "de"], candidate_languages=["fr"])
    assert (kept, dropped) == (["c0", "c1"], {"c2": "language"})
    kept, dropped = run(samples[:1], languages=["en"], candidate_languages=["de"], min_confidence=0.999)
    assert dropped == {"c0": "language"}  # right language, not sure enough


def test_no_text_when_a_text_rule_is_set():
    samples = [pair("t", image_bytes(), "a caption"), {"__key__": "n", "png": image_bytes()},
               pair("e", image_bytes(), "   ")]
    assert run(samples, min_words=1) == (["t"], {"n": "no_text", "e": "no_text"})
    assert run(samples, min_side=1) == (["t", "n", "e"], {})  # image rules need no text


def test_image_min_side_and_max_aspect_datacomp():
    samples = [pair("ok", image_bytes(size=(250, 250)), "a"), pair("small", image_bytes(size=(150, 300)), "b"),
               pair("wide", image_bytes(size=(900, 250)), "c"), pair("tall", image_bytes(size=(200, 600)), "d"),
               pair("bad", image_bytes(fmt="JPEG")[:80], "e", ext="jpg"), speech("audio", tone_flac(0.2), "f")]
    kept, dropped = run(samples, min_side=200, max_aspect=3)
    assert kept == ["ok", "tall", "audio"]  # 200x600 is exactly 3: kept; speech has no image to judge
    assert dropped == {"small": "min_side", "wide": "max_aspect", "bad": "corrupt"}


def test_first_failing_rule_is_recorded():
    samples = [pair("both", image_bytes(size=(50, 50)), "x")]
    assert run(samples, min_words=2, min_side=100)[1] == {"both": "caption_words"}


def test_audio_duration_silence_and_chars_per_second():
    samples = [speech("short", tone_flac(0.5), "hi there"), speech("ok", tone_flac(2.0), "the quick brown fox jumps"),
               speech("long", tone_flac(6.0), "two words"), speech("quiet", tone_flac(0.5, silent_seconds=1.5), "x y"),
               speech("bad", b"fLaC not really", "corrupt")]
    assert run(samples, min_seconds=1, max_seconds=5) == (["ok", "quiet"], {"short": "duration", "long": "duration",
                                                                            "bad": "corrupt"})
    assert run(samples[:4], max_silence_ratio=0.5) == (["short", "ok", "long"], {"quiet": "silence"})
    # "the quick brown fox jumps": 21 characters (spaces excluded) in 2 s = 10.5/s; "x y" in 2 s = 1/s
    assert run(samples[:4], min_chars_per_second=5, max_chars_per_second=12) == (
        ["ok"], {"short": "chars_per_second", "long": "chars_per_second", "quiet": "chars_per_second"})
    assert run([pair("img", image_bytes(), "no audio here")], min_seconds=1) == (["img"], {})


def test_silence_ratio_measures_20ms_frames_below_the_threshold():
    assert silence_ratio(tone_flac(1.0), -40) == 0.0
    assert silence_ratio(tone_flac(1.0, silent_seconds=3.0), -40) == pytest.approx(0.75, abs=0.01)
    assert silence_ratio(tone_flac(1.0, amplitude=0.005), -40) == 1.0  # -49 dBFS RMS: quieter than the threshold
    assert silence_ratio(tone_flac(1.0, amplitude=0.005), -60) == 0.0


def test_every_rule_is_off_by_default():
    samples = [pair("tiny", image_bytes(size=(2, 40)), ""), pair("bad", b"not an image", "x", ext="jpg"),
               speech("q", tone_flac(0.01, silent_seconds=5), "")]
    assert run(samples) == (["tiny", "bad", "q"], {})  # nothing is decoded when no rule needs it


@pytest.mark.parametrize("cfg,message", [
    ({"languages": ["english"]}, "unknown language code 'english'"),
    ({"languages": ["en"], "candidate_languages": []}, "at least two languages"),
    ({"blocklist_regex": ["(unclosed"]}, "not a regular expression"),
    ({"max_aspect": 0.5}, "at least 1"),
    ({"min_confidence": 2}, "0..1"),
    ({"max_silence_ratio": 1.5}, "0..1"),
])
def test_bad_settings_are_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        list(filters.apply([], FiltersConfig(**cfg), Report("filters")))
