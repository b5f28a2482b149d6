"""python -m mm.asr: transcribe files and folders into every format, past bad files; score on shards. Mostly
against tests.asr_fakes' stand-in transcriber (fast); at the end, end to end with the real Transcriber on the
session's trained tiny model (tests/asr_fixtures.py), compared with what that model says in this process."""
import json
import os
import re
import subprocess
import sys

import pytest

from mm.asr.__main__ import main
from tests.asr_fakes import FakeTranscriber, install_fake_transcriber, wav_bytes, write_audio
from tests.asr_fixtures import heldout_clips, trained_run  # noqa: F401 - a fixture
from tests.helpers import ROOT, SUBPROCESS_ENV, one_torch_thread, tiny_asr_corpus, write_tar  # noqa: F401


@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "run").mkdir()
    return str(tmp_path / "run")


def test_one_file_to_stdout(tmp_path, ckpt, monkeypatch, capsys):
    made = install_fake_transcriber(monkeypatch)
    audio = write_audio(tmp_path / "talk.wav")
    assert main(["transcribe", str(audio), "--checkpoint", ckpt]) == 0
    out = capsys.readouterr()
    assert out.out == "hello\nworld\n" and out.err == ""
    assert made[0].calls == [{"n": 1, "language": None, "task": "transcribe", "timestamps": True, "batch_size": 16}]
    assert main(["transcribe", str(audio), "--checkpoint", ckpt, "--format", "srt"]) == 0
    assert capsys.readouterr().out == ("1\n00:00:00,000 --> 00:00:00,500\nhello\n\n"
                                       "2\n00:00:00,500 --> 00:00:01,000\nworld\n\n")


def test_a_folder_into_every_format_past_bad_files(tmp_path, ckpt, monkeypatch, capsys):
    install_fake_transcriber(monkeypatch)
    rec = tmp_path / "rec"
    write_audio(rec / "a.wav")
    write_audio(rec / "b.flac", seconds=2.0, peak=0.25)  # the fake hears Russian
    write_audio(rec / "sub" / "c.ogg")
    (rec / "notes.txt").write_text("not picked: not an audio extension")
    (rec / "broken.mp3").write_bytes(b"ID3 but nothing after")
    (rec / "empty.wav").write_bytes(b"")
    (rec / "phone.m4a").write_bytes(b"\0\0\0\x20ftypM4A ")
    out = tmp_path / "out"
    rc = main(["transcribe", str(rec), str(tmp_path / "missing.wav"), "--checkpoint", ckpt, "--format", "all",
               "--output-dir", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{name}.{ext}" for name in ("a", "b", "sub/c")
                             for ext in ("txt", "json", "srt", "vtt", "tsv"))
    assert (out / "b.txt").read_text(encoding="utf-8") == "привет\nмир\n"
    assert json.loads((out / "b.json").read_text(encoding="utf-8"))["language"] == "ru"
    assert (out / "sub" / "c.vtt").read_text().startswith("WEBVTT\n\n00:00.000 --> 00:00.500\nhello\n")
    assert (out / "a.tsv").read_text() == "start\tend\ttext\n0\t500\thello\n500\t1000\tworld\n"
    assert "4 of 7 inputs failed:" in err, err
    for name, words in [("broken.mp3", "not audio"), ("empty.wav", "empty"), ("phone.m4a", "not audio"),
                        ("missing.wav", "no such file or folder")]:
        assert any(name in line and words in line for line in err.splitlines()), (name, err)
    assert "Traceback" not in err


def test_decoding_options_reach_the_transcriber(tmp_path, ckpt, monkeypatch, capsys):
    made = install_fake_transcriber(monkeypatch)
    files = [str(write_audio(tmp_path / f"{i}.wav")) for i in range(3)]
    rc = main(["transcribe", *files, "--checkpoint", ckpt, "--language", "Russian", "--beam-size", "5",
               "--temperature", "0.2", "--no-timestamps", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    assert made[0].device == "cpu"
    assert made[0].calls == [{"n": n, "language": "ru", "task": "transcribe", "timestamps": False, "batch_size": 2,
                              "beam_size": 5, "temperature": 0.2} for n in (2, 1)]
    out = capsys.readouterr().out
    assert out.count("==> ") == 3 and f"==> {files[1]} <==\nпривет мир\n" in out


@pytest.mark.parametrize("args, status, words", [
    (["--language", "de"], 2, "does not know language 'de' (en, ru, el)"),
    (["--language", "klingon"], 2, "unknown language 'klingon'"),
    (["--task", "translate"], 2, "cannot translate"),
    (["--checkpoint", "nowhere/asr"], 1, "no checkpoint at nowhere/asr: train one with `python recipes/asr/train.py`"),
])
def test_unusable_requests_say_why_before_any_file_is_read(tmp_path, ckpt, monkeypatch, capsys, args, status, words):
    made = install_fake_transcriber(monkeypatch, can_translate=False)
    audio = write_audio(tmp_path / "talk.wav")
    assert main(["transcribe", str(audio), "--checkpoint", ckpt, *args]) == status
    assert words in capsys.readouterr().err
    assert all(not m.calls for m in made)


def test_argument_errors(tmp_path, ckpt, monkeypatch, capsys):
    install_fake_transcriber(monkeypatch)
    audio = str(write_audio(tmp_path / "talk.wav"))
    for args, words in [(["--format", "all"], "--format all needs --output-dir"),
                        (["--format", "docx"], "invalid choice"), (["--batch-size", "0"], "must be at least 1")]:
        with pytest.raises(SystemExit) as e:
            main(["transcribe", audio, "--checkpoint", ckpt, *args])
        assert e.value.code == 2 and words in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["transcribe", str(tmp_path / "nothing"), "--checkpoint", ckpt]) == 2
    assert "no audio files (none in " in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "gone.wav"), "--checkpoint", ckpt]) == 2
    assert f"no audio files ({tmp_path / 'gone.wav'}: no such file or folder)" in capsys.readouterr().err


def test_outputs_that_would_collide_are_not_overwritten(tmp_path, ckpt, monkeypatch, capsys):
    install_fake_transcriber(monkeypatch)
    a, b = write_audio(tmp_path / "x" / "talk.wav"), write_audio(tmp_path / "y" / "talk.wav", peak=0.25)
    out = tmp_path / "out"
    assert main(["transcribe", str(a), str(b), str(a), "--checkpoint", ckpt, "--output-dir", str(out)]) == 1
    assert (out / "talk.txt").read_text() == "hello\nworld\n"  # a's, written once
    err = capsys.readouterr().err
    assert "1 of 2 inputs failed" in err and f"{b}: its output talk.* would overwrite that of {a}" in err


class FailsOnLongAudio(FakeTranscriber):
    """A model error on one file (any over 1.5 s) in a batch."""

    def transcribe_batch(self, audios, *args, **kwargs):
        if any(len(a) > 1.5 * 16000 for a in audios):
            raise RuntimeError("CUDA out of memory (pretend)")
        return super().transcribe_batch(audios, *args, **kwargs)


def test_a_model_error_fails_its_file_only(tmp_path, ckpt, monkeypatch, capsys):
    install_fake_transcriber(monkeypatch, cls=FailsOnLongAudio)
    files = [write_audio(tmp_path / "a.wav"), write_audio(tmp_path / "long.wav", seconds=2.0),
             write_audio(tmp_path / "c.wav")]
    out = tmp_path / "out"
    assert main(["transcribe", *map(str, files), "--checkpoint", ckpt, "--output-dir", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "c.txt"]
    assert f"{files[1]}: RuntimeError: CUDA out of memory (pretend)" in capsys.readouterr().err


def test_runs_as_a_program_and_says_how_to_get_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mm.asr", "transcribe", "a.wav"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no checkpoint at runs/asr: train one with `python recipes/asr/train.py`" in proc.stderr


# ---------------------------------------------------------------- eval

def heldout_shard(path):
    """Six utterances: en said right, en said wrong, ru said right but heard as en, ru right, el right x2."""
    items = [("en", "Hello, world!", 0.5), ("en", "goodbye moon", 0.5), ("ru", "привет мир", 0.5),
             ("ru", "привет мир", 0.25), ("el", "γεια σου κόσμε", 0.75),
             ("el", "Γεια σου, κόσμε.", 0.75)]
    return write_tar(path, [{"__key__": f"{i:03d}", "wav": wav_bytes(1.0 + i / 10, peak=peak),
                             "json": json.dumps({"text": text, "language": lang})}
                            for i, (lang, text, peak) in enumerate(items)])


def test_eval_scores_per_language_with_the_worst_examples(tmp_path, ckpt, monkeypatch, capsys):
    made = install_fake_transcriber(monkeypatch)
    shard = heldout_shard(tmp_path / "heldout.tar")
    rc = main(["eval", "--data", str(shard), "--checkpoint", ckpt, "--worst", "2", "--json", str(tmp_path / "s.json"),
               "--batch-size", "4"])
    assert rc == 0
    result = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert result["eval_utterances"] == 6 and result["eval_audio_s"] == pytest.approx(7.5)
    assert result["n/en"] == 2 and result["wer/en"] == 0.5 and result["cer/el"] == 0.0  # corpus-level: 2 of 4 words
    assert result["lid_acc/ru"] == 0.5 and result["lid_acc"] == pytest.approx(5 / 6) and result["wer/ru"] == 0.5
    assert result["rtf"] > 0 and result["model"] == "fake:run" and result["language"] == "detect"
    worst = result["worst"]
    assert [(w["reference"], w["hypothesis"]) for w in worst] == [("привет мир", "hello world"),
                                                                  ("goodbye moon", "hello world")]
    assert worst[0]["cer"] == pytest.approx(1.1) and worst[0]["detected"] == "en" and worst[0]["key"] == "002"
    out = capsys.readouterr().out
    assert "language" in out and "real-time factor" in out and "worst 2 by CER" in out
    assert "ru, heard as en  (002)" in out
    assert [c["n"] for c in made[0].calls] == [4, 2]


def test_eval_in_the_given_language(tmp_path, ckpt, monkeypatch, capsys):
    made = install_fake_transcriber(monkeypatch)
    shard = heldout_shard(tmp_path / "heldout.tar")
    assert main(["eval", "--data", str(shard), "--checkpoint", ckpt, "--language", "given", "--worst", "1"]) == 0
    calls = made[0].calls
    assert sorted((c["language"], c["n"]) for c in calls) == [("el", 2), ("en", 2), ("ru", 2)]
    out = capsys.readouterr().out
    assert "goodbye moon" in out and "привет" not in out.split("worst")[1]  # Russian is right when given
    install_fake_transcriber(monkeypatch, languages=("en", "ru"))
    assert main(["eval", "--data", str(shard), "--checkpoint", ckpt, "--language", "given"]) == 2
    assert "language 'el', which fake:run does not know" in capsys.readouterr().err


def test_eval_on_nothing_usable(tmp_path, ckpt, monkeypatch, capsys):
    install_fake_transcriber(monkeypatch)
    shard = write_tar(tmp_path / "bad.tar", [{"__key__": "000", "wav": b"not audio", "txt": "x"}])
    assert main(["eval", "--data", str(shard), "--checkpoint", ckpt]) == 2
    assert "no usable samples" in capsys.readouterr().err


def test_decoding_options_the_transcriber_refuses_are_an_argument_error_before_any_file_is_read(
        tmp_path, ckpt, monkeypatch, capsys):
    class RefusesWideBeams(FakeTranscriber):
        def transcribe_batch(self, audios, *args, beam_size=None, **kwargs):
            if beam_size is not None and beam_size > 4:
                raise ValueError(f"beam_size {beam_size} is wider than this model allows")
            return super().transcribe_batch(audios, *args, **kwargs)

    made = install_fake_transcriber(monkeypatch, cls=RefusesWideBeams)
    files = [str(write_audio(tmp_path / f"{i}.wav")) for i in range(2)]
    assert main(["transcribe", *files, "--checkpoint", ckpt, "--beam-size", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("beam_size 5 is wider than this model allows") == 1 and "Traceback" not in err
    assert made[0].calls == []
    for bad in ("-1", "nan", "inf", "hot"):
        with pytest.raises(SystemExit) as e:
            main(["transcribe", *files, "--checkpoint", ckpt, "--temperature", bad])
        assert e.value.code == 2 and "--temperature" in capsys.readouterr().err


def test_a_file_that_is_no_checkpoint_is_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello\n")  # torch's unpickler raises KeyError on it
    audio = write_audio(tmp_path / "talk.wav")
    assert main(["transcribe", str(audio), "--checkpoint", str(tmp_path / "notes.pt")]) == 1
    assert "notes.pt: cannot load it as a checkpoint (KeyError" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["eval", "--data", "x", "--checkpoint", str(tmp_path / "folder")]) == 1
    assert "not a Hugging Face Whisper folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "x", "--checkpoint", str(tmp_path / "folder"), "--json", "nowhere/s.json"])
    assert e.value.code == 2 and "--json nowhere/s.json: no folder to write it in" in capsys.readouterr().err


# ---------------------------------------------------------------- the real Transcriber, the session's tiny model

@pytest.fixture(scope="module")
def asr(trained_run, one_torch_thread):
    """The trained run loaded in this process, on one thread as the subprocesses (same numbers, bit for bit)."""
    from mm.asr.transcriber import Transcriber

    return Transcriber.from_checkpoint(trained_run, device="cpu")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mm.asr", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})


@pytest.mark.slow
def test_a_folder_with_the_real_model_into_every_format_past_a_bad_file(trained_run, asr, tmp_path):
    from mm.asr.formats import FORMATS, format_transcript

    folder = tmp_path / "rec"
    folder.mkdir()
    clips = {key: flac for key, flac, _ in heldout_clips(trained_run)[:2]}  # an English and a Russian clip
    for key, flac in clips.items():
        (folder / f"{key}.flac").write_bytes(flac)
    (folder / "broken.wav").write_bytes(b"RIFF, then nothing a wav needs")
    out = tmp_path / "out"
    proc = run_cli("transcribe", str(folder), "--checkpoint", str(trained_run), "--format", "all",
                   "--output-dir", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "1 of 3 inputs failed:" in proc.stderr and f"{folder / 'broken.wav'}: not audio" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{key}.{fmt}" for key in clips for fmt in FORMATS)
    for key in clips:
        said = asr.transcribe(folder / f"{key}.flac")  # as the CLI: language detected, timestamps, defaults
        assert said.text and said.segments and said.segments[-1].end > said.segments[0].start
        assert all(s.temperature == 0 for s in said.segments)  # no fallback: sampled text differs between processes
        for fmt in ("txt", "srt", "vtt", "tsv"):
            assert (out / f"{key}.{fmt}").read_text(encoding="utf-8") == format_transcript(said, fmt), (key, fmt)
        written = json.loads((out / f"{key}.json").read_text(encoding="utf-8"))
        assert {k: written[k] for k in ("text", "language", "duration")} == {
            "text": said.text, "language": said.language, "duration": said.duration}
        assert [(s["start"], s["end"], s["text"], s["tokens"]) for s in written["segments"]] == [
            (s.start, s.end, s.text, s.tokens) for s in said.segments]
        assert written["language_prob"] == pytest.approx(said.language_prob, abs=1e-6)


@pytest.mark.slow
def test_eval_with_the_real_model_scores_as_the_library_does(trained_run, asr, tmp_path, tmp_path_factory):
    """Batched in the CLI, one by one here. At temperature 0 only: a fallback decode would sample, and random
    draws differ between processes (the model is confident on all nine clips, but that is its business)."""
    from mm.asr.metrics import asr_scores, error_rates, normalize_text
    from mm.media import load_audio

    heldout = tiny_asr_corpus(tmp_path_factory) / "heldout"  # the run's held-out split
    proc = run_cli("eval", "--data", str(heldout), "--checkpoint", str(trained_run), "--worst", "3",
                   "--temperature", "0", "--json", str(tmp_path / "scores.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    rows = []
    for key, flac, meta in heldout_clips(trained_run):  # one by one, in this process
        said = asr.transcribe(load_audio(flac), temperature=0.0)
        wer, cer = error_rates([normalize_text(meta["text"], meta["language"])],
                               [normalize_text(said.text, meta["language"])])
        rows.append({"key": key, "language": meta["language"], "detected": said.language,
                     "reference": meta["text"], "hypothesis": said.text, "wer": wer, "cer": cer})
    want = asr_scores([r["reference"] for r in rows], [r["hypothesis"] for r in rows],
                      [r["language"] for r in rows], [r["detected"] for r in rows])
    assert {"wer/en", "cer/ru", "lid_acc/el", "lid_acc", "cer_mean"} <= set(want)
    assert {k: result[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert result["eval_utterances"] == len(rows) == 9 and 0 < result["rtf"] < 10
    assert result["eval_audio_s"] == pytest.approx(sum(m["duration"] for _, _, m in heldout_clips(trained_run)),
                                                   abs=0.01)
    by_key = {r["key"]: r for r in rows}
    assert [w["cer"] for w in result["worst"]] == pytest.approx(sorted((r["cer"] for r in rows), reverse=True)[:3])
    for w in result["worst"]:
        assert {k: w[k] for k in ("hypothesis", "detected", "reference", "wer", "cer")} == pytest.approx(
            {k: by_key[w["key"]][k] for k in ("hypothesis", "detected", "reference", "wer", "cer")})
    assert result["model"] == trained_run.name and result["temperature"] == 0 and "real-time factor" in proc.stdout
    assert all(re.search(rf"^ *{lang} +3 ", proc.stdout, re.M) for lang in ("en", "ru", "el")), proc.stdout


@pytest.mark.slow
def test_eval_with_the_ctc_head_scores_as_the_recipes_evaluation(trained_run, one_torch_thread, tmp_path,
                                                                   tmp_path_factory):
    """--ctc-weight: the run's newest checkpoint (the export has no CTC head), decoded by joint beam search, as
    mm.asr.evaluate.evaluate_asr scores it in this process."""
    import torch

    from mm.asr.evaluate import evaluate_asr
    from mm.asr.transcriber import load_model_and_tokenizer

    heldout = tiny_asr_corpus(tmp_path_factory) / "heldout"
    proc = run_cli("eval", "--data", str(heldout), "--checkpoint", str(trained_run), "--ctc-weight", "0.5",
                   "--beam-size", "4", "--device", "cpu", "--json", str(tmp_path / "scores.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    model, tokenizer, _ = load_model_and_tokenizer(trained_run, ctc_head=True)
    assert model.ctc_head is not None
    want = evaluate_asr(model, tokenizer, str(heldout), torch.device("cpu"), batch_size=16, ctc_weight=0.5,
                        beam_size=4)
    keys = [k for k in want if k.startswith(("cer", "wer", "lid_acc", "n/"))]
    assert len(keys) == 21 and {k: result[k] for k in keys} == pytest.approx({k: want[k] for k in keys})
    assert result["eval_beam_size"] == 4 and result["eval_utterances"] == 9 and result["ctc_weight"] == 0.5
    assert "beam search (4 beams) joint with the CTC head (weight 0.5)" in proc.stdout
    assert all(re.search(rf"^ *{lang} +3 ", proc.stdout, re.M) for lang in ("en", "ru", "el")), proc.stdout

    no_head = run_cli("eval", "--data", str(heldout), "--checkpoint", str(trained_run / "export" / "hf"),
                      "--ctc-weight", "0.5", "--device", "cpu")
    assert no_head.returncode == 2 and "no CTC head" in no_head.stderr and "Traceback" not in no_head.stderr
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(heldout), "--checkpoint", str(trained_run), "--ctc-weight", "1"])


@pytest.mark.slow
def test_the_clis_decoding_options_reach_the_real_transcriber(trained_run, asr, tmp_path, capsys):
    from mm.asr.formats import format_transcript

    key, flac, _ = heldout_clips(trained_run)[0]
    clip = tmp_path / f"{key}.flac"
    clip.write_bytes(flac)
    options = {"beam_size": 2, "temperature": 0.0, "initial_prompt": "forums heads"}
    assert main(["transcribe", str(clip), "--checkpoint", str(trained_run), "--device", "cpu", "--beam-size", "2",
                 "--temperature", "0", "--initial-prompt", "forums heads", "--no-timestamps", "--language", "en",
                 "--format", "json", "--output-dir", str(tmp_path / "out")]) == 0
    said = asr.transcribe(clip, language="en", timestamps=False, **options)
    assert json.loads((tmp_path / "out" / f"{key}.json").read_text(encoding="utf-8"))["text"] == said.text
    assert said.language_prob == 1.0 and len(said.segments) <= 1  # given, not detected; no timestamps
    assert format_transcript(said, "txt")
    # what the real transcriber refuses, the CLI says once, as an argument error (TranscribeOptions' own checks)
    from mm.asr.__main__ import check_decoding

    for bad, words in [({"beam_size": 0}, "beam_size must be at least 1"), ({"beams": 2}, "unknown options"),
                       ({"task": "translate"}, "cannot translate"), ({"temperature": ()}, "at least one")]:
        with pytest.raises(ValueError, match=words):
            check_decoding(asr, **bad)


def test_installed_as_mm_asr():
    """pyproject's console script names this main, which takes argv=None and returns the exit status."""
    import importlib

    entry = re.search(r'^mm-asr = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert entry and getattr(importlib.import_module(entry.group(1)), entry.group(2)) is main
