"""data_tools.write_asr_shards: manifests, Common Voice and LibriSpeech folders become shards that mm's ASR
decoder reads back as 16 kHz mono with the right transcripts; bad items are counted under their reason."""
import collections
import csv
import functools
import http.server
import io
import json
import os
import threading

import numpy as np
import pytest
import soundfile

from data_tools.write_asr_shards import NothingWritten, detect_asr_kind, main, write_asr_shards
from mm.decoders import audio_decoder
from mm.shards import expand_shard_spec, read_samples

CAN_WRITE_MP3 = "MP3" in soundfile.available_formats()  # libsndfile >= 1.1 with its MPEG encoder


def tone(seconds, rate, channels=1, freq=440.0):
    """A sine at half scale, float32 [T] or [T, channels] (each channel a different phase)."""
    t = np.arange(round(seconds * rate)) / rate
    waves = [0.5 * np.sin(2 * np.pi * freq * t + c) for c in range(channels)]
    return np.stack(waves, axis=1).astype(np.float32) if channels > 1 else waves[0].astype(np.float32)


def save_audio(path, seconds, rate=16000, channels=1, format=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(str(path), tone(seconds, rate, channels), rate, format=format)
    return path


def write_rows(path, rows):
    """A manifest from dicts: CSV/TSV by the suffix (columns of the first row), JSONL one object (or raw line) each."""
    if str(path).endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        return path
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if str(path).endswith(".tsv") else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_back(output):
    """[(sample's json, decoded sample)] in shard order, read and decoded as the ASR recipe's loader does."""
    counts = collections.Counter()
    urls = [u for source in expand_shard_spec(str(output)) for u in source.urls]
    decode = audio_decoder(max_seconds=30.0)
    out = []
    for raw in read_samples(urls, counts):
        assert sorted(k for k in raw if not k.startswith("__")) == ["flac", "json"]
        info = soundfile.info(io.BytesIO(raw["flac"]))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
        out.append((json.loads(raw["json"]), decode(raw)))
    assert counts["bad_shards"] == 0
    return out


def by_text(samples):
    return {meta["text"]: (meta, decoded) for meta, decoded in samples}


def shard_bytes(output):
    return {f: (output / f).read_bytes() for f in sorted(os.listdir(output)) if f.endswith(".tar")}


# ---------------------------------------------------------------- manifests

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_manifest_rows_become_16k_mono_samples_and_failures_are_counted(tmp_path, suffix):
    data = tmp_path / "data"
    save_audio(data / "clips" / "stereo.wav", 0.5, rate=44100, channels=2)
    narrowband = save_audio(data / "phone.wav", 0.8, rate=8000)
    save_audio(data / "silent_text.wav", 0.3)
    (data / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rows = [{"audio": "clips/stereo.wav", "text": " hello world ", "language": "en"},
            {"audio": str(narrowband), "text": "guten tag", "language": ""},  # absolute path; blank -> --language
            {"audio": "missing.wav", "text": "never read", "language": "en"},
            {"audio": "corrupt.wav", "text": "noise", "language": "en"},
            {"audio": "silent_text.wav", "text": "  ", "language": "en"}]
    manifest = write_rows(data / f"train{suffix}", rows)

    stats = write_asr_shards(str(manifest), str(tmp_path / "out"), language="de", num_workers=2)
    assert stats["kind"] == "manifest" and stats["written"] == 2 and stats["failed"] == 3
    assert stats["failures"] == {"missing_file": 1, "unreadable_audio": 1, "empty_transcript": 1}
    assert {e["source"] for e in stats["examples"]} == {"missing.wav", "corrupt.wav", "silent_text.wav"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert stats["languages"]["en"]["count"] == 1 and stats["languages"]["de"]["count"] == 1
    assert stats["hours"] == pytest.approx(1.3 / 3600, abs=1e-5)

    samples = by_text(read_back(tmp_path / "out"))
    assert set(samples) == {"hello world", "guten tag"}
    for text, language, source, seconds in [("hello world", "en", "clips/stereo.wav", 0.5),
                                            ("guten tag", "de", str(narrowband), 0.8)]:
        meta, decoded = samples[text]
        assert (decoded["text"], decoded["language"], meta["source"]) == (text, language, source)
        assert decoded["audio"].ndim == 1 and decoded["duration"] == pytest.approx(seconds, abs=0.01)
        assert meta["duration"] == pytest.approx(seconds, abs=0.01) and "segments" not in meta
        assert 0.3 < decoded["audio"].abs().max() < 0.6  # a half-scale tone, resampled and down-mixed, not silence


def test_nemo_manifest_segments_and_duration_limits(tmp_path):
    for name, seconds in [("a", 1.0), ("b", 0.6), ("long", 1.5), ("short", 0.2)]:
        save_audio(tmp_path / f"{name}.wav", seconds)
    good = [{"start": 0, "end": 0.5, "text": "first"}, {"start": 0.5, "end": 1.0, "text": " second"}]
    bad = {"past the end": [{"start": 0.2, "end": 1.3, "text": "x"}],
           "backwards": [{"start": 0.5, "end": 0.4, "text": "x"}],
           "no text": [{"start": 0.0, "end": 0.4, "text": 7}], "not a list": {"start": 0, "end": 1},
           "string times": [{"start": "0", "end": "0.5", "text": "x"}]}
    rows = [{"audio_filepath": "a.wav", "text": "with segments", "duration": 1.0, "segments": good},
            {"audio_filepath": "b.wav", "text": "without segments"},
            {"audio_filepath": "long.wav", "text": "too long"},
            {"audio_filepath": "short.wav", "text": "too short"},
            *({"audio_filepath": "a.wav", "text": text, "segments": segs} for text, segs in bad.items()),
            '{"audio_filepath": "a.wav", "text": ',  # cut off mid-line
            "[1, 2]", {"text": "no audio"}, {"audio_filepath": "a.wav", "text": 42}]
    manifest = write_rows(tmp_path / "nemo.jsonl", rows)

    stats = write_asr_shards(str(manifest), str(tmp_path / "out"), language="en", max_seconds=1.2, min_seconds=0.3)
    assert stats["failures"] == {"too_long": 1, "too_short": 1, "bad_segments": len(bad), "bad_row": 4}
    samples = by_text(read_back(tmp_path / "out"))
    assert set(samples) == {"with segments", "without segments"}
    meta, decoded = samples["with segments"]
    assert meta["segments"] == [{"start": 0.0, "end": 0.5, "text": "first"},
                                {"start": 0.5, "end": 1.0, "text": " second"}]  # floats; text as given
    assert meta["language"] == decoded["language"] == "en" and meta["duration"] == 1.0
    assert "segments" not in samples["without segments"][0]


def test_manifest_without_its_columns_fails_naming_them(tmp_path):
    manifest = write_rows(tmp_path / "m.csv", [{"wav": "a.wav", "text": "hi"}])
    with pytest.raises(ValueError, match=r"no column 'audio'.*'wav'.*--audio_key="):
        write_asr_shards(str(manifest), str(tmp_path / "out"))
    save_audio(tmp_path / "a.wav", 0.3)
    stats = write_asr_shards(str(manifest), str(tmp_path / "out"), audio_key="wav")
    assert stats["written"] == 1 and stats["languages"] == {"unknown": {"count": 1, "hours": stats["hours"]}}
    assert read_back(tmp_path / "out")[0][1]["language"] is None  # no language anywhere: null, as the loader reads it


def test_manifest_audio_over_http(tmp_path):
    save_audio(tmp_path / "www" / "remote.wav", 0.4, rate=24000)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        manifest = write_rows(tmp_path / "m.jsonl", [{"audio": f"{base}/remote.wav", "text": "from afar"},
                                                     {"audio": f"{base}/absent.wav", "text": "404"}])
        stats = write_asr_shards(str(manifest), str(tmp_path / "out"), language="en")
    finally:
        server.shutdown()
        server.server_close()
    assert stats["written"] == 1 and stats["failures"] == {"download_failed": 1}
    meta, decoded = read_back(tmp_path / "out")[0]
    assert meta["source"] == f"{base}/remote.wav" and decoded["duration"] == pytest.approx(0.4, abs=0.01)


# ---------------------------------------------------------------- Common Voice and LibriSpeech

CV_COLUMNS = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
              "gender", "accents", "variant", "locale", "segment"]


def write_commonvoice(root, tsv, rows):
    """`root/<tsv>` with Common Voice's columns (unquoted, as CV writes them) and its clips as MP3 when
    libsndfile can encode MP3 here, else WAV under the .mp3 name (libsndfile reads by content, not by name)."""
    with open(root / tsv, "w") as f:
        f.write("\t".join(CV_COLUMNS) + "\n")
        for clip, sentence, locale, seconds in rows:
            if seconds is not None:
                save_audio(root / "clips" / clip, seconds, rate=48000, format="MP3" if CAN_WRITE_MP3 else "WAV")
            values = {"client_id": "c0ffee", "path": clip, "sentence": sentence, "up_votes": "2", "locale": locale}
            f.write("\t".join(values.get(c, "") for c in CV_COLUMNS) + "\n")


def test_commonvoice_folder(tmp_path):
    root = tmp_path / "cv-corpus" / "basque"
    (root / "clips").mkdir(parents=True)
    write_commonvoice(root, "validated.tsv", [
        ("common_voice_eu_1.mp3", '"Kaixo," esan zuen.', "eu", 0.6),  # a leading quote: read as written
        ("common_voice_eu_2.mp3", "Egun on guztioi.", "", 0.9),  # no locale (nor --language): the folder's name
        ("common_voice_eu_3.mp3", "Ez dago hemen.", "eu", None)])  # its clip is missing
    write_commonvoice(root, "dev.tsv", [("common_voice_eu_4.mp3", "Beste bat.", "eu", 0.4)])
    assert detect_asr_kind(str(root)) == "commonvoice"

    stats = write_asr_shards(str(root), str(tmp_path / "out"))
    assert stats["kind"] == "commonvoice" and stats["written"] == 2 and stats["failures"] == {"missing_file": 1}
    assert stats["examples"][0]["source"] == "clips/common_voice_eu_3.mp3"
    samples = by_text(read_back(tmp_path / "out"))
    assert set(samples) == {'"Kaixo," esan zuen.', "Egun on guztioi."}
    meta, decoded = samples['"Kaixo," esan zuen.']
    assert (meta["source"], decoded["language"]) == ("clips/common_voice_eu_1.mp3", "eu")
    assert decoded["duration"] == pytest.approx(0.6, abs=0.01)  # libsndfile drops the MP3 encoder's padding
    assert samples["Egun on guztioi."][1]["language"] == "basque"

    stats = write_asr_shards(str(root), str(tmp_path / "dev"), split="dev", language="xx")
    decoded = read_back(tmp_path / "dev")[0][1]
    assert stats["written"] == 1 and (decoded["text"], decoded["language"]) == ("Beste bat.", "eu")  # locale first


@pytest.mark.skipif(not CAN_WRITE_MP3, reason="this libsndfile cannot encode MP3; the test above used WAV clips")
def test_commonvoice_clips_are_real_mp3(tmp_path):
    root = tmp_path / "en"
    (root / "clips").mkdir(parents=True)
    write_commonvoice(root, "validated.tsv", [("a.mp3", "An MP3 clip.", "en", 0.5)])
    assert soundfile.info(str(root / "clips" / "a.mp3")).format == "MP3"
    assert write_asr_shards(str(root), str(tmp_path / "out"))["written"] == 1
    assert read_back(tmp_path / "out")[0][1]["text"] == "An MP3 clip."


def make_librispeech(root):
    """Two speakers, one chapter each: 3 utterances with audio, one whose .flac is missing."""
    chapters = {("19", "198"): [("0000", "CHAPTER ONE", 0.5), ("0001", "THE SECOND LINE", 0.7)],
                ("26", "495"): [("0000", "ANOTHER SPEAKER", 0.4), ("0001", "LOST AUDIO", None)]}
    for (speaker, chapter), utterances in chapters.items():
        folder = root / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for number, text, seconds in utterances:
            utterance = f"{speaker}-{chapter}-{number}"
            if seconds is not None:
                save_audio(folder / f"{utterance}.flac", seconds)
            lines.append(f"{utterance} {text}\n")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return root


def test_librispeech_folder(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech" / "dev-clean")
    assert detect_asr_kind(str(root.parent)) == "librispeech"  # trans.txt files at any depth

    stats = write_asr_shards(str(root), str(tmp_path / "out"))
    assert stats["written"] == 3 and stats["failures"] == {"missing_file": 1}
    assert stats["examples"][0]["source"] == os.path.join("26", "495", "26-495-0001.flac")
    samples = by_text(read_back(tmp_path / "out"))
    assert set(samples) == {"CHAPTER ONE", "THE SECOND LINE", "ANOTHER SPEAKER"}
    meta, decoded = samples["THE SECOND LINE"]
    assert meta["source"] == os.path.join("19", "198", "19-198-0001.flac")
    assert decoded["language"] == "en" and decoded["duration"] == pytest.approx(0.7, abs=0.01)
    assert stats["languages"] == {"en": {"count": 3, "hours": stats["hours"]}}

    write_asr_shards(str(root), str(tmp_path / "lower"), lowercase=True, language="en-GB")
    assert {m["text"]: m["language"] for m, _ in read_back(tmp_path / "lower")} == {
        "chapter one": "en-GB", "the second line": "en-GB", "another speaker": "en-GB"}


# ---------------------------------------------------------------- the whole run

def test_rerun_writes_byte_identical_shards(tmp_path):
    root = make_librispeech(tmp_path / "ls")
    first = write_asr_shards(str(root), str(tmp_path / "a"), max_count=2, num_workers=1)
    assert first["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    write_asr_shards(str(root), str(tmp_path / "b"), max_count=2, num_workers=3)  # threads finish in any order
    (tmp_path / "b" / "shard-000007.tar").write_bytes(b"stale")  # an earlier, bigger run's
    write_asr_shards(str(root), str(tmp_path / "b"), max_count=2, num_workers=3)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert [raw["__key__"] for raw in read_samples([str(tmp_path / "a" / s) for s in first["shards"]],
                                                   collections.Counter())] == ["000000000", "000000001", "000000002"]

    capped = write_asr_shards(str(root), str(tmp_path / "c"), max_items=2, shuffle=False)
    assert capped["written"] == 2 and [m["text"] for m, _ in read_back(tmp_path / "c")] == [
        "CHAPTER ONE", "THE SECOND LINE"]  # unshuffled: the input's order, keys running from 000000000


def test_detect_asr_kind(tmp_path):
    manifest = write_rows(tmp_path / "m.tsv", [{"audio": "a.wav", "text": "hi"}])
    assert detect_asr_kind(str(manifest)) == "manifest"
    (tmp_path / "cv" / "clips").mkdir(parents=True)
    (tmp_path / "cv" / "train.tsv").write_text("path\tsentence\n")
    assert detect_asr_kind(str(tmp_path / "cv"), split="train") == "commonvoice"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_asr_kind(str(tmp_path / "cv"))  # no validated.tsv
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a manifest"):
        detect_asr_kind(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError):
        detect_asr_kind(str(tmp_path / "nowhere"))


def test_nothing_written_is_an_error(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"")
    rows = [{"audio": "broken.wav", "text": "a"}, {"audio": "gone.wav", "text": "b"}]
    manifest = write_rows(tmp_path / "m.csv", rows)
    with pytest.raises(NothingWritten, match="all 2 failed") as caught:
        write_asr_shards(str(manifest), str(tmp_path / "out"))
    assert caught.value.stats["failures"] == {"empty_audio": 1, "missing_file": 1}
    assert os.listdir(tmp_path / "out") == ["stats.json"]  # no empty shard left to mislead a loader

    with pytest.raises(SystemExit) as exit_:
        main([f"--input={manifest}", f"--output={tmp_path / 'out'}"])
    assert "nothing written" in str(exit_.value.code) and "stats.json" in str(exit_.value.code)


def test_command_line(tmp_path, capsys):
    save_audio(tmp_path / "a.wav", 0.5, rate=22050)
    manifest = write_rows(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "hello", "lang": "x"}])
    main([f"--input={manifest}", f"--output={tmp_path / 'out'}", "--language=en", "--shuffle=false", "--num_workers=1"])
    assert "wrote 1 clips" in capsys.readouterr().out
    assert read_back(tmp_path / "out")[0][1]["language"] == "en"  # the column is "language" unless named
    with pytest.raises(SystemExit):
        main([f"--input={manifest}", f"--output={tmp_path / 'out'}", "--shuffle=maybe"])
