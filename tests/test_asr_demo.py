"""demos/asr_app.py, the Gradio speech recognition demo: started as a user starts it, in a folder whose runs/asr is
the model and data/asr_synth the built-in corpus, and driven by gradio_client and by headless Chromium (Debian's
/usr/bin/chromium, never a Playwright download).

The demo serves the real Transcriber on the session's trained tiny model (tests/asr_fixtures.py; it learnt its
training clips by heart, so on held-out clips it says words of its vocabulary, often not the right ones): what the
page and the API show is compared with what the same model says in this process. The tests in this process that
only check what is refused before the model runs use tests.asr_fakes' stand-in."""
import importlib.util
import json
import random
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mm.asr.formats import format_timestamp, format_transcript, language_name
from mm.media import SAMPLE_RATE, load_audio
from tests.asr_fakes import FakeTranscriber, install_fake_transcriber, write_audio
from tests.asr_fixtures import trained_run  # noqa: F401 - a fixture
from tests.helpers import CHROMIUM, ROOT, chromium_or_skip, free_port, one_torch_thread, tiny_asr_corpus  # noqa: F401 - a fixture
from tests.zeroshot_fixtures import python, serve

APP = ROOT / "demos" / "asr_app.py"
# Above the browser tests' takes (2 and 6 s) with room for a loaded machine to stretch them; small, so an
# over-long clip is cheap to make.
MAX_SECONDS = 12.0
# 819,200 bytes: holds a MAX_SECONDS recording as the page sends it (768,044 bytes; the demo refuses to start with
# less) and any test clip but the one meant to be too big.
MAX_FILE_SIZE = "800kb"
MAX_FILE_BYTES = 800 * 1024
TIMESTAMP = re.compile(r"^\d\d:\d\d\.\d\d\d$")
TRAIN_COMMAND = "python recipes/asr/train.py"
CORPUS_COMMAND = "python -m data_tools.synthetic_asr --out=data/asr_synth"


def demo_command(*args: str) -> list[str]:
    return python(str(APP), *args)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_asr_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def asr_run(trained_run) -> Path:
    """The run folder the demo finds as runs/asr: the session's trained tiny model, on the corpus below. (A
    10-step run of the recipe says nothing worth comparing; this one is trained once for all the ASR tests.)"""
    return trained_run


@pytest.fixture(scope="module")
def model(asr_run, one_torch_thread):
    """The model the demo serves, loaded in this process on one thread as the demo (the same numbers): what the
    demo shows must be what it says."""
    from mm.asr.transcriber import Transcriber

    return Transcriber.from_checkpoint(asr_run, device="cpu", max_seconds=MAX_SECONDS)


def start_demo(work: Path, *args: str, command=demo_command):
    """(URL, a context manager serving it) for `python demos/asr_app.py --port P ARGS` run in `work`, its temp
    files under work/tmp and its output in work/demo.log."""
    (work / "tmp").mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = ["env", f"TMPDIR={work / 'tmp'}", *command("--port", str(port), *args)]
    return url, serve(cmd, url, work / "demo.log", cwd=work)


@pytest.fixture(scope="module")
def demo(asr_run, corpus, tmp_path_factory):
    """(URL, log path) of the demo run in a folder whose runs/asr is the model and data/asr_synth the corpus, as
    after `python recipes/asr/train.py`; no --host: it must bind 127.0.0.1."""
    work = tmp_path_factory.mktemp("asr_demo")
    (work / "runs").mkdir()
    (work / "runs" / "asr").symlink_to(asr_run, target_is_directory=True)
    (work / "data").mkdir()
    (work / "data" / "asr_synth").symlink_to(corpus, target_is_directory=True)
    url, server = start_demo(work, "--device", "cpu", "--max-seconds", str(MAX_SECONDS),
                             "--max-file-size", MAX_FILE_SIZE)
    with server:
        yield url, work / "demo.log"


@pytest.fixture(scope="module")
def clip(corpus, tmp_path_factory) -> Path:
    """The first English held-out utterance of the corpus (espeak speech), as a flac file."""
    with tarfile.open(next((corpus / "heldout").glob("shard-*.tar"))) as tar:
        for member in tar:
            if member.name.endswith(".json") and json.load(tar.extractfile(member))["language"] == "en":
                flac = tar.extractfile(member.name[:-len(".json")] + ".flac").read()
                break
    path = tmp_path_factory.mktemp("clips") / "heldout-en.flac"
    path.write_bytes(flac)
    return path


def load_app():
    spec = importlib.util.spec_from_file_location("asr_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wav_of(samples: np.ndarray, path: Path) -> Path:
    soundfile.write(path, samples.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return path


def gradio_cache_dirs() -> list[str]:
    """Where the server keeps files, which no message may show."""
    return [tempfile.gettempdir(), "/tmp", "gradio"]


# ---------------------------------------------------------------- through the API

def transcribe(url: str, path: Path, language: str = "auto", task: str = "transcribe", timestamps: bool = True):
    from gradio_client import Client, handle_file

    return Client(url, verbose=False).predict(handle_file(str(path)), language, task, timestamps,
                                              api_name="/transcribe")


def expected_rows(transcript) -> list[list[str]]:
    return [[format_timestamp(s.start), format_timestamp(s.end), s.text.strip()] for s in transcript.segments]


@pytest.mark.slow
def test_a_heldout_clip_gets_its_language_transcript_segments_and_subtitles(demo, clip, model):
    url, log = demo
    said = model.transcribe(load_audio(clip), language=None, task="transcribe", timestamps=True)
    language, text, table, srt, vtt = transcribe(url, clip)
    name = language_name(said.language).title()
    assert language == f"{name} ({said.language}), detected with probability {said.language_prob:.0%}"
    assert text and text == said.text.strip()
    assert all(s.temperature == 0 for s in said.segments)  # no fallback: sampled text differs between processes
    assert table["headers"] == ["start", "end", "text"] and table["data"] == expected_rows(said)
    assert all(TIMESTAMP.match(start) and TIMESTAMP.match(end) for start, end, _ in table["data"])
    assert table["data"][-1][1] != "00:00.000"  # a real end time, not a placeholder
    assert (Path(srt).name, Path(vtt).name) == ("heldout-en.srt", "heldout-en.vtt")  # named after the upload
    assert Path(srt).read_text(encoding="utf-8") == format_transcript(said, "srt")
    assert Path(vtt).read_text(encoding="utf-8") == format_transcript(said, "vtt")
    assert re.search(rf"Running on local URL:\s+{re.escape(url.rstrip('/'))}\b", log.read_text())  # no --host


@pytest.mark.slow
def test_a_chosen_language_and_no_timestamps_reach_the_model_which_cannot_translate(demo, clip, model):
    from gradio_client.exceptions import AppError

    url, _ = demo
    said = model.transcribe(load_audio(clip), language="ru", task="transcribe", timestamps=False)
    language, text, table, srt, _ = transcribe(url, clip, "ru", "transcribe", False)
    assert language == "Russian (ru), as chosen"
    assert text == said.text.strip() and table["data"] == expected_rows(said)
    assert Path(srt).read_text(encoding="utf-8") == format_transcript(said, "srt")
    assert model.can_translate is False  # recipes/asr never trains <|translate|>
    with pytest.raises(AppError, match="cannot translate: it was trained to transcribe only"):
        transcribe(url, clip, "auto", "translate")


@pytest.fixture(scope="module")
def bad_uploads(tmp_path_factory) -> dict[Path, str]:
    """{file: words the refusal holds} for audio the demo must refuse, each under the upload size limit."""
    folder = tmp_path_factory.mktemp("bad")
    noise = np.random.default_rng(0).normal(0, 1e-4, 2 * SAMPLE_RATE)  # about -80 dBFS
    (folder / "random.wav").write_bytes(random.Random(0).randbytes(20_000))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.flac").write_text("not audio at all\n")
    return {
        wav_of(np.zeros(2 * SAMPLE_RATE), folder / "silence.wav"): "silent (digital silence",
        wav_of(noise, folder / "hiss.wav"): "below -60 dBFS",
        folder / "random.wav": "not audio soundfile can decode",
        folder / "empty.wav": "empty file (0 bytes)",
        folder / "text.flac": "not audio soundfile can decode",
        write_audio(folder / "long.flac", seconds=MAX_SECONDS + 1): f"13.0 s exceeds the limit of {MAX_SECONDS:g} s",
    }


@pytest.mark.slow
def test_bad_audio_gets_a_clear_message_and_the_app_keeps_working(demo, clip, bad_uploads):
    from gradio_client.exceptions import AppError

    url, _ = demo
    good = transcribe(url, clip)
    requests_ = [(path, "auto", "transcribe", words) for path, words in bad_uploads.items()] + [
        (clip, "xx", "transcribe", "unknown language 'xx'"),
        (clip, "auto", "sing", "unknown task 'sing'"),
    ]
    for path, language, task, words in requests_:
        with pytest.raises(AppError) as e:  # not gradio's generic "The upstream Gradio app has raised an exception"
            transcribe(url, path, language, task)
        message = str(e.value)
        assert words in message, (path.name, message)
        assert not any(d in message for d in gradio_cache_dirs()), message  # no server paths
        assert transcribe(url, clip)[:3] == good[:3]  # and the next request is answered as before


@pytest.mark.slow
def test_an_upload_over_the_size_limit_is_refused_before_it_is_stored(demo, tmp_path):
    import requests
    from gradio_client import Client, handle_file

    url, _ = demo
    big = write_audio(tmp_path / "big.wav", seconds=30)  # 960 kB of wav, over 800kb
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_FILE_BYTES} bytes"):  # gradio_client
        Client(url, verbose=False).predict(handle_file(str(big)), "auto", "transcribe", True, api_name="/transcribe")
    response = requests.post(f"{url}gradio_api/upload", files={"files": ("big.wav", big.read_bytes())})
    assert response.status_code == 413 and f"{MAX_FILE_BYTES} bytes" in response.text  # the server's own


# ---------------------------------------------------------------- in a browser

def open_page(pw, url: str, *chromium_args: str):
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                 args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                       *chromium_args])
    page = browser.new_page()
    page.set_default_timeout(120_000)  # generous hang guards, not speed limits
    # Only the demo itself: fonts or anything else off this machine would just hang offline.
    page.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    page.goto(url)
    return browser, page


def transcribe_in_page(page, expect, subtitles_named: str) -> None:
    """Wait for the audio to be in place, press Transcribe, wait for the subtitle file named after the audio."""
    expect(page.locator("#audio button[aria-label='Play']")).to_be_visible()  # uploaded: clicking earlier sends none
    page.locator("#transcribe").click()
    expect(page.locator("#srt")).to_contain_text(subtitles_named)
    expect(page.locator("#vtt")).to_contain_text(subtitles_named)


@pytest.mark.slow
def test_in_a_browser_upload_a_clip_and_see_its_transcript_and_timestamps(demo, clip, model, tmp_path):
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    said = model.transcribe(load_audio(clip), language=None, task="transcribe", timestamps=True)
    expect.set_options(timeout=120_000)
    with sync_playwright() as pw:
        browser, page = open_page(pw, demo[0])
        try:
            page.locator("#audio input[type=file]").set_input_files(str(clip))
            transcribe_in_page(page, expect, "heldout-en")  # the files to download, named after the upload
            expect(page.locator("#text textarea")).to_have_value(said.text.strip())
            expect(page.locator("#detected textarea")).to_have_value(re.compile(r"\(\w+\), detected with probability"))
            segments = page.locator("#segments")
            for start, end, words in expected_rows(said):
                for cell in (start, end, words):
                    expect(segments).to_contain_text(cell)
            page.screenshot(path=str(tmp_path / "asr_demo.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "asr_demo.png").stat().st_size > 1000


# Chromium's fake microphone, allowed without asking: a beeping test signal.
FAKE_MICROPHONE = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")


def record(page, expect, seconds: float) -> Path:
    """Record a take of about `seconds` from the microphone; the wav the page uploaded, as the server stored it.
    Each step waits for the page's state (recording, uploaded), so a slow machine only makes the take longer."""
    page.locator("#audio button[aria-label='Record audio']").click()  # the microphone source
    page.locator("#audio button", has_text=re.compile("^Record$")).click()
    stop = page.locator("#audio button:visible", has_text=re.compile("^Stop$")).first
    expect(stop).to_be_visible()  # recording
    page.wait_for_timeout(seconds * 1000)  # the take's length, not a wait for the page
    # The page sends the take when it stops; one over the size limit it would keep on screen and never send.
    with page.expect_response(lambda r: "/gradio_api/upload" in r.url and r.request.method == "POST") as sent:
        stop.click()
    assert sent.value.status == 200, sent.value.text()
    stored, = sent.value.json()
    return Path(stored)


@pytest.mark.slow
def test_in_a_browser_an_example_and_the_microphone_can_be_transcribed(demo, tmp_path):
    """A held-out example clicked, then a short recording from Chromium's fake microphone."""
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as pw:
        browser, page = open_page(pw, demo[0], *FAKE_MICROPHONE)
        try:
            page.get_by_text(re.compile(r"^Russian: ")).click()  # one held-out example per language
            transcribe_in_page(page, expect, "ru-")  # named after the example's clip
            expect(page.locator("#text textarea")).not_to_have_value("")
            page.locator("#audio button[aria-label='Clear']").click()
            take = record(page, expect, seconds=2)
            transcribe_in_page(page, expect, "audio")  # gradio names a recording audio.wav
            expect(page.locator("#segments")).to_contain_text("00:00.000")
            page.screenshot(path=str(tmp_path / "asr_demo_mic.png"), full_page=True)
        finally:
            browser.close()
    assert take.name == "audio.wav" and soundfile.info(take).samplerate == SAMPLE_RATE  # the rate the model hears
    assert (tmp_path / "asr_demo_mic.png").stat().st_size > 1000


@pytest.mark.slow
def test_in_a_browser_a_longer_recording_is_transcribed(demo):
    """6 s from the microphone: at gradio's default 44.1 kHz this take outgrew the upload limit (300kb then) from
    about 3.5 s on, and the page silently kept it, so Transcribe was told there was no audio."""
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as pw:
        browser, page = open_page(pw, demo[0], *FAKE_MICROPHONE)
        try:
            take = record(page, expect, seconds=6)
            transcribe_in_page(page, expect, "audio")
            expect(page.locator("#detected textarea")).to_have_value(re.compile(r"\(\w+\), detected with probability"))
            expect(page.locator("#segments")).to_contain_text("00:00.000")
        finally:
            browser.close()
    info = soundfile.info(take)
    assert info.samplerate == SAMPLE_RATE and 5.5 < info.duration <= MAX_SECONDS


# ---------------------------------------------------------------- without a model

@pytest.mark.slow
def test_without_a_model_it_starts_and_says_how_to_train_one(tmp_path, clip):
    """No arguments, in a folder with neither runs/asr nor the corpus: the page and the API say what to run.
    Plain `python demos/asr_app.py`, never the stand-in: without a model it must not need mm.asr.transcriber."""
    import requests
    from gradio_client.exceptions import AppError

    url, server = start_demo(tmp_path, command=lambda *args: python(str(APP), *args))
    with server:
        config = json.dumps(requests.get(f"{url}config").json())
        assert TRAIN_COMMAND in config and "No speech recognition model at `runs/asr`" in config
        assert CORPUS_COMMAND in config  # no held-out clips to offer either
        with pytest.raises(AppError, match=re.escape(TRAIN_COMMAND)):
            transcribe(url, clip)
    assert TRAIN_COMMAND in (tmp_path / "demo.log").read_text()


# ---------------------------------------------------------------- in this process

def test_what_the_model_cannot_do_is_refused_before_it_runs(tmp_path):
    from gradio.exceptions import Error

    app = load_app()
    model = FakeTranscriber(can_translate=False)
    demo = app.build_demo(model, examples_dir=str(tmp_path / "none"), cache=tmp_path)
    task, = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "task"]
    assert task.interactive is False and "cannot translate" in task.info
    audio, = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "audio"]
    assert audio.waveform_options.sample_rate == SAMPLE_RATE  # the page records at the rate the model hears
    transcribe_ = app.make_transcribe(model, MAX_SECONDS, 10**6, tmp_path / "out", "runs/asr")
    path = write_audio(tmp_path / "a.wav")
    with pytest.raises(Error, match="cannot translate: it was trained to transcribe only"):
        transcribe_({"path": str(path), "orig_name": "a.wav"}, "auto", "translate", True)
    with pytest.raises(Error, match=rf"record from the microphone first. \(A recording much longer than {MAX_SECONDS:g} s"):
        transcribe_(None, "auto", "transcribe", True)  # also what a recording too big to upload leaves
    with pytest.raises(Error, match="timestamps: true or false, not 'no'"):
        transcribe_({"path": str(path), "orig_name": "a.wav"}, "auto", "transcribe", "no")
    with pytest.raises(Error) as e:
        transcribe_({"path": str(tmp_path / "gone.wav"), "orig_name": "a.wav"}, "auto", "transcribe", True)
    assert e.value.message == "the uploaded audio: no such file"  # not the server's path
    assert model.calls == []


def test_examples_are_one_clip_per_language_extracted_once(corpus, tmp_path):
    app = load_app()
    examples = app.extract_examples(corpus / "heldout", tmp_path)
    assert [label.split(":")[0] for _, label in examples] == ["English", "Russian", "Greek"]
    for path, label in examples:
        assert len(load_audio(path)) > SAMPLE_RATE // 2 and label.split(": ", 1)[1]
    assert app.extract_examples(corpus / "heldout", tmp_path) == examples  # from the cache, not re-extracted
    assert len(list(tmp_path.iterdir())) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-000000.tar").write_bytes(b"not a tar")
    clips, note = app.find_examples(str(bad), tmp_path / "cache")
    assert clips == [] and "Could not read the held-out clips" in note and CORPUS_COMMAND in note
    clips, note = app.find_examples(str(tmp_path / "nowhere"), tmp_path / "cache")
    assert clips == [] and "No held-out clips at" in note and CORPUS_COMMAND in note


def test_main_queues_one_request_at_a_time_binds_localhost_and_limits_uploads(monkeypatch, tmp_path):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(demo=self, **kw))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "asr").mkdir(parents=True)
    made = install_fake_transcriber(monkeypatch)
    load_app().main(["--max-seconds", "30", "--max-file-size", "20mb", "--port", "7999"])
    assert made[0].max_seconds == 30.0 and made[0].name == "fake:asr"
    queue = launched["demo"]._queue
    assert queue.default_concurrency_limit == 1 and queue.max_size == 16  # as --help says
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", 7999, False)
    assert launched["max_file_size"] == 20 * 1024 ** 2


def test_a_missing_checkpoint_named_on_the_command_line_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_app().main(["--checkpoint", str(tmp_path / "typo")])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_app().main(["--max-file-size", "lots"])
    assert "give a size such as 25mb" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("hello\n")  # there, but no checkpoint: refused at start, no traceback
    with pytest.raises(SystemExit, match=r"notes.pt: cannot load it as a checkpoint \(KeyError"):
        load_app().main(["--checkpoint", str(tmp_path / "notes.pt")])


def test_the_upload_limit_must_hold_a_recording_of_the_longest_audio_allowed(capsys):
    """The page drops a take over --max-file-size without a word, so the demo refuses limits that allow it."""
    app = load_app()
    assert app.recording_bytes(30) == 44 + 30 * 16000 * 2 * 2  # 16 kHz, 16-bit, stereo at worst
    app.check_limits(600, 100 * 1024 ** 2)  # the defaults
    app.check_limits(120, 20 * 1024 ** 2)  # the example in --help
    app.check_limits(MAX_SECONDS, MAX_FILE_BYTES)  # the demo these tests start
    with pytest.raises(SystemExit) as e:
        app.main(["--max-seconds", "5", "--max-file-size", "300kb"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot hold a 5 s microphone recording (320,044 bytes" in err
    assert "give --max-file-size 313kb or more, or a smaller --max-seconds" in err
