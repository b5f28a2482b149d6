"""data_tools/synthetic_asr.py: the espeak corpus the ASR recipe trains on out of the box."""
import io
import json
import re
import shutil
import unicodedata

import pytest
import soundfile

from data_tools.synthetic_asr import (APT_PACKAGES, HELDOUT_VARIANTS, LANGUAGES, SAMPLE_RATE, SCRIPTS, TRAIN_VARIANTS,
                                      ensure_synthetic_asr)
from mm.shards import read_samples
from tests.helpers import ROOT, TINY_ASR_CORPUS, tiny_asr_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny_asr_corpus(tmp_path_factory)


def read_split(folder) -> list[dict]:
    """Every sample of a split: its json, plus "key" and the raw "flac" bytes."""
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    return [{**json.loads(s["json"]), "key": s["__key__"], "flac": s["flac"]}
            for s in read_samples(urls, {"bad_shards": 0})]


@pytest.fixture(scope="session")
def splits(corpus):
    return {split: read_split(corpus / split) for split in ("train", "heldout")}


def test_corpus_has_the_languages_asked_in_their_scripts(corpus, splits):
    info = json.loads((corpus / "info.json").read_text())
    assert info["languages"] == ["en", "ru", "el"]
    for split, per_language in (("train", 12), ("heldout", 3)):
        samples = splits[split]
        assert sorted(s["language"] for s in samples) == sorted(["en", "ru", "el"] * per_language), split
        assert {lang: c["count"] for lang, c in info[split].items()} == {"en": per_language, "ru": per_language,
                                                                          "el": per_language}
        for s in samples:  # every letter of a transcript is of its language's script
            letters = [c for c in s["text"] if c.isalpha()]
            assert letters and all(SCRIPTS[s["language"]] in unicodedata.name(c) for c in letters), s["text"]
    assert len(set(SCRIPTS[lang] for lang in LANGUAGES)) >= 3  # the default corpus: Latin, Cyrillic, Greek
    assert set(SCRIPTS) == set(LANGUAGES)


def test_heldout_texts_and_voices_never_occur_in_training(splits):
    train_texts = {s["text"] for s in splits["train"]}
    assert len(train_texts) == len(splits["train"])  # no sentence twice
    assert not train_texts & {s["text"] for s in splits["heldout"]}
    variant = {split: [s["voice"].split("+", 1)[1] for s in samples] for split, samples in splits.items()}
    assert set(variant["train"]) <= set(TRAIN_VARIANTS)
    assert set(variant["heldout"]) <= set(HELDOUT_VARIANTS)
    assert not set(HELDOUT_VARIANTS) & set(TRAIN_VARIANTS)
    for s in splits["train"] + splits["heldout"]:
        assert s["voice"].split("+")[0] == LANGUAGES[s["language"]][0]  # the language's own espeak voice


def test_multi_phrase_samples_carry_ordered_segments_inside_the_audio(splits):
    samples = splits["train"] + splits["heldout"]
    with_segments = [s for s in samples if "segments" in s]
    assert 0 < len(with_segments) < len(samples)  # multi_prob=0.3 of 45 utterances
    for s in with_segments:
        segs = s["segments"]
        assert len(segs) >= 2
        assert " ".join(seg["text"] for seg in segs) == s["text"]
        assert segs[0]["start"] == 0.0
        for a, b in zip(segs, segs[1:]):
            assert a["start"] < a["end"] < b["start"] < b["end"]  # a pause between phrases
        assert segs[-1]["end"] <= s["duration"] + 0.01  # times are rounded to 0.01 s


def test_audio_is_16k_mono_flac_of_the_declared_duration(splits):
    for s in splits["train"][:6] + splits["heldout"]:
        info = soundfile.info(io.BytesIO(s["flac"]))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 1)
        assert info.frames / SAMPLE_RATE == pytest.approx(s["duration"], abs=1e-3)
        assert 0.3 < s["duration"] < 15


def test_ensure_keeps_a_matching_corpus_and_rewrites_a_changed_one(corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    shard = copy / "train" / "shard-000000.tar"
    before = (shard.stat().st_mtime_ns, shard.read_bytes())
    info = ensure_synthetic_asr(copy, **TINY_ASR_CORPUS)
    assert info == json.loads((corpus / "info.json").read_text())
    assert (shard.stat().st_mtime_ns, shard.read_bytes()) == before  # not written again

    info = ensure_synthetic_asr(copy, **{**TINY_ASR_CORPUS, "per_language": 2, "heldout_per_language": 1,
                                         "languages": ("en",)})
    assert info["per_language"] == 2 and info["languages"] == ["en"]
    assert json.loads((copy / "info.json").read_text()) == info
    train, heldout = read_split(copy / "train"), read_split(copy / "heldout")
    assert [s["language"] for s in train] == ["en", "en"] and [s["language"] for s in heldout] == ["en"]
    assert sorted(p.name for p in (copy / "train").iterdir()) == ["shard-000000.tar"]  # no old shard mixed in


def test_setup_installs_every_debian_package_the_corpus_needs():
    """setup.sh's apt_pkgs (what `bash setup.sh` installs, the test setup adding to it) names APT_PACKAGES:
    espeak-ng and the word lists."""
    text = (ROOT / "setup.sh").read_text()
    base = re.search(r'^apt_pkgs="([^"]*)"', text, re.M)
    assert base, "setup.sh has no apt_pkgs= line"
    missing = sorted(set(APT_PACKAGES) - set(base.group(1).split()))
    assert not missing, f"bash setup.sh does not install {missing}, which data_tools/synthetic_asr.py needs"
    for extra in re.findall(r'then apt_pkgs="([^"]*)"', text):  # `bash setup.sh test` must not drop them
        assert "$apt_pkgs" in extra.split() or set(APT_PACKAGES) <= set(extra.split()), extra
