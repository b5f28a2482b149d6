"""The OpenAI-compatible ASR HTTP API: OpenAI's request fields and answer shapes, and a matrix of hostile requests
against a real uvicorn server started as a user starts it. The matrix runs against tests.asr_fakes' stand-in
transcriber (fast); at the end a second server runs the real Transcriber on the session's trained tiny model
(tests/asr_fixtures.py): its answers are compared with what that model says in this process, and part of the
matrix is sent to it again."""
import threading

import pytest
import requests

from mm.asr.formats import language_name
from tests.asr_fakes import FakeTranscriber, wav_bytes
from tests.asr_fixtures import heldout_clips, trained_run  # noqa: F401 - a fixture
from tests.helpers import ROOT, free_port, one_torch_thread  # noqa: F401 - a fixture
from tests.zeroshot_fixtures import python, serve

pytestmark = pytest.mark.slow  # a real server in a subprocess
MAX_UPLOAD = 200_000  # bytes; small, so the tests can go over it cheaply
MAX_SECONDS = 2.0
REAL_MAX_SECONDS = 5.0  # the real model's server: room for a held-out clip (up to ~3 s)
SEGMENT_KEYS = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                "no_speech_prob"}
# `python -m mm.asr serve`, with tests.asr_fakes' transcriber standing in for mm.asr.transcriber's
SERVE_FAKE = ("import sys, types; from tests.asr_fakes import FakeTranscriber; "
              "m = types.ModuleType('mm.asr.transcriber'); m.Transcriber = FakeTranscriber; "
              "sys.modules['mm.asr.transcriber'] = m; from mm.asr.__main__ import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of the server on a free port (no --host: it must pick 127.0.0.1)."""
    tmp = tmp_path_factory.mktemp("asr_http")
    (tmp / "run").mkdir()
    port = free_port()
    cmd = python("-c", SERVE_FAKE, "serve", "--checkpoint", str(tmp / "run"), "--port", str(port),
                 "--max-upload-bytes", str(MAX_UPLOAD), "--max-seconds", str(MAX_SECONDS))
    url = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{url}/health", tmp / "server.log", cwd=ROOT):
        yield url, tmp / "server.log"


def post(url, file: bytes | None = None, endpoint: str = "transcriptions", **fields):
    file = wav_bytes() if file is None else file
    files = {"file": ("talk.wav", file, "audio/wav")} if file is not ... else None
    return requests.post(f"{url}/v1/audio/{endpoint}", files=files,
                         data={k: v for k, v in fields.items() if v is not None})


def test_health_docs_and_localhost_binding(server):
    url, log = server
    health = requests.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "fake:run" and health["languages"] == ["en", "ru", "el"]
    assert health["max_upload_bytes"] == MAX_UPLOAD and health["max_seconds"] == MAX_SECONDS and health["can_translate"]
    spec = requests.get(f"{url}/openapi.json").json()
    assert {"/v1/audio/transcriptions", "/v1/audio/translations", "/health"} <= set(spec["paths"])
    ref = spec["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    assert set(form["properties"]) == {"file", "model", "language", "prompt", "response_format", "temperature",
                                       "timestamp_granularities[]"}
    assert form["required"] == ["file"]
    assert f"Uvicorn running on {url}" in log.read_text()


def test_every_response_format(server):
    url, _ = server
    r = post(url, model="whisper-1")
    assert r.status_code == 200 and r.json() == {"text": "hello world"}
    r = post(url, response_format="text")
    assert r.text == "hello world\n" and r.headers["content-type"].startswith("text/plain")
    r = post(url, response_format="srt")
    assert r.text.startswith("1\n00:00:00,000 --> 00:00:00,500\nhello\n\n2\n")
    assert r.headers["content-type"].startswith("text/plain")
    r = post(url, response_format="vtt")
    assert r.text.startswith("WEBVTT\n\n00:00.000 --> 00:00.500\nhello\n")
    assert r.headers["content-type"].startswith("text/plain")
    v = post(url, response_format="verbose_json", **{"timestamp_granularities[]": ["segment", "word"]}).json()
    assert {k: v[k] for k in ("task", "language", "duration", "text")} == {
        "task": "transcribe", "language": "english", "duration": 1.0, "text": "hello world"}
    assert [set(s) for s in v["segments"]] == [SEGMENT_KEYS] * 2
    assert [(s["start"], s["end"], s["text"]) for s in v["segments"]] == [(0.0, 0.5, " hello"), (0.5, 1.0, " world")]


def test_languages_and_translation(server):
    url, _ = server
    assert post(url, wav_bytes(peak=0.25)).json() == {"text": "привет мир"}  # detected
    assert post(url, language="ru").json() == {"text": "привет мир"}  # given, as a code
    assert post(url, language="Greek", response_format="verbose_json").json()["language"] == "greek"  # or a name
    r = post(url, endpoint="translations", model="whisper-1", response_format="verbose_json")
    assert r.status_code == 200 and r.json()["task"] == "translate" and r.json()["text"] == "[translated] hello world"


def chunked_oversized_body():
    """A well-formed multipart upload sent chunked (no Content-Length), 400 kB of audio."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--xyz\r\n'
           b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n')
    for _ in range(40):
        yield b"\0" * 10_000
    yield b"\r\n--xyz--\r\n"


BAD_REQUESTS = {  # name: (request, expected status, words in the message)
    "not audio": (lambda u: post(u, b"hello, this is text"), 415, "talk.wav: not audio"),
    "truncated audio": (lambda u: post(u, wav_bytes()[:30]), 415, "talk.wav"),
    "empty file": (lambda u: post(u, b""), 400, "empty"),
    "no file field": (lambda u: post(u, ..., model="whisper-1"), 400, "file: Field required"),
    "no body at all": (lambda u: requests.post(f"{u}/v1/audio/transcriptions"), 400, "file: Field required"),
    "file just over the limit": (lambda u: post(u, b"RIFF" + b"\0" * MAX_UPLOAD), 413,
                                 f"file over the limit of {MAX_UPLOAD:,} bytes"),
    "body far over the limit": (lambda u: post(u, b"\0" * 5_000_000), 413, "request body over the limit"),
    "chunked body over the limit": (lambda u: requests.post(
        f"{u}/v1/audio/transcriptions", data=chunked_oversized_body(),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 413, "request body over the limit"),
    # 3 s at 8 kHz is 48 kB: under the size limit, over the duration limit; refused from the header
    "audio too long": (lambda u: post(u, wav_bytes(3.0, rate=8000)), 413, "3.0 s exceeds the limit of 2 s"),
    "unknown language": (lambda u: post(u, language="xx"), 400, "unknown language 'xx'"),
    "language the model lacks": (lambda u: post(u, language="de"), 400, "'de' is not one this model knows"),
    "unknown response_format": (lambda u: post(u, response_format="docx"), 400, "unknown response_format 'docx'"),
    "unknown granularity": (lambda u: post(u, **{"timestamp_granularities[]": "char"}), 400,
                            "unknown timestamp granularity 'char'"),
    "temperature not a number": (lambda u: post(u, temperature="hot"), 400, "temperature"),
    "temperature over 1": (lambda u: post(u, temperature="1.5"), 400, "temperature"),
    "translation in a bad format": (lambda u: post(u, endpoint="translations", response_format="mp3"), 400,
                                    "unknown response_format"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_in_openai_shape_and_the_server_lives_on(server, case):
    url, log = server
    request, status, words = BAD_REQUESTS[case]
    r = request(url)
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"]["message"] and body["detail"] == body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert r.headers["content-type"] == "application/json" and "Traceback" not in r.text
    assert requests.get(f"{url}/health").status_code == 200
    assert post(url).json() == {"text": "hello world"}  # and still transcribes


def test_the_openai_client(server, tmp_path):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    audio = tmp_path / "talk.wav"
    audio.write_bytes(wav_bytes())
    with open(audio, "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=f).text == "hello world"
    with open(audio, "rb") as f:
        v = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                               timestamp_granularities=["segment"])
    assert v.language == "english" and len(v.segments) == 2
    with open(audio, "rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert "00:00:00,000 --> 00:00:00,500" in srt


# ---------------------------------------------------------------- in process (FastAPI's TestClient)

def client_for(transcriber, **kwargs):
    from fastapi.testclient import TestClient

    from mm.asr.server import create_app

    return TestClient(create_app(transcriber, **kwargs), raise_server_exceptions=False)


def test_options_reach_the_transcriber_only_when_set():
    fake = FakeTranscriber()
    client = client_for(fake)
    files = {"file": ("a.flac", wav_bytes(fmt="FLAC"), "audio/flac")}
    assert client.post("/v1/audio/transcriptions", files=files).status_code == 200
    assert client.post("/v1/audio/transcriptions", files=files,
                       data={"temperature": "0.4", "prompt": "Hello.", "language": "en"}).status_code == 200
    assert fake.calls == [{"n": 1, "language": None, "task": "transcribe", "timestamps": True, "batch_size": 1},
                          {"n": 1, "language": "en", "task": "transcribe", "timestamps": True, "batch_size": 1,
                           "temperature": 0.4, "initial_prompt": "Hello."}]


def test_translation_refused_by_a_model_that_cannot():
    r = client_for(FakeTranscriber(can_translate=False)).post(
        "/v1/audio/translations", files={"file": ("a.wav", wav_bytes(), "audio/wav")})
    assert r.status_code == 400 and "cannot translate" in r.json()["error"]["message"]


def test_duration_limit_defaults_to_the_transcribers():
    client = client_for(FakeTranscriber(max_seconds=1.5))
    assert client.get("/health").json()["max_seconds"] == 1.5
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(2.0), "audio/wav")})
    assert r.status_code == 413 and "exceeds the limit of 1.5 s" in r.json()["error"]["message"]


def test_concurrent_requests_run_the_model_one_at_a_time():
    fake = FakeTranscriber(delay=0.2)
    client = client_for(fake)
    statuses = []

    def one():
        r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(), "audio/wav")})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 4 and len(fake.calls) == 4 and fake.most_active == 1


def test_unexpected_errors_are_a_json_500_without_a_trace():
    class Broken(FakeTranscriber):
        def transcribe(self, *args, **kwargs):
            raise RuntimeError("secret internals")

    r = client_for(Broken()).post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(), "audio/wav")})
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "internal server error (see the server log)", "type": "server_error", "param": None, "code": None}
    assert "secret" not in r.text


def test_options_the_transcriber_refuses_are_a_400_before_the_file_is_read():
    class RefusesPrompts(FakeTranscriber):
        def transcribe_batch(self, audios, *args, initial_prompt=None, **kwargs):
            if initial_prompt is not None:
                raise ValueError("initial_prompt: this model takes no prompt")
            return super().transcribe_batch(audios, *args, **kwargs)

    fake = RefusesPrompts()
    r = client_for(fake).post("/v1/audio/transcriptions", data={"prompt": "Hello."},
                              files={"file": ("a.wav", b"not even audio", "audio/wav")})
    assert r.status_code == 400 and r.json()["error"]["message"] == "initial_prompt: this model takes no prompt"
    assert fake.calls == []


# ---------------------------------------------------------------- the real Transcriber, the session's tiny model

@pytest.fixture(scope="module")
def asr(trained_run, one_torch_thread):
    """The trained run loaded in this process, on one thread as the server (the same numbers)."""
    from mm.asr.transcriber import Transcriber

    return Transcriber.from_checkpoint(trained_run, device="cpu", max_seconds=REAL_MAX_SECONDS)


@pytest.fixture(scope="module")
def real_server(trained_run, tmp_path_factory):
    """`python -m mm.asr serve --checkpoint RUN`: the trained tiny model."""
    log = tmp_path_factory.mktemp("asr_http_real") / "server.log"
    port = free_port()
    cmd = python("-m", "mm.asr", "serve", "--checkpoint", str(trained_run), "--port", str(port), "--device", "cpu",
                 "--max-upload-bytes", str(MAX_UPLOAD), "--max-seconds", str(REAL_MAX_SECONDS))
    url = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{url}/health", log, cwd=ROOT):
        yield url


@pytest.fixture(scope="module")
def heldout_flac(trained_run) -> bytes:
    return heldout_clips(trained_run)[0][1]  # English, 2.35 s: never heard in training


def test_the_real_model_answers_json_verbose_json_and_srt(real_server, asr, heldout_flac, trained_run):
    from mm.asr.formats import format_transcript

    url = real_server
    health = requests.get(f"{url}/health").json()
    assert health["model"] == trained_run.name and {"en", "ru", "el"} <= set(health["languages"])
    assert health["can_translate"] is False and health["max_seconds"] == REAL_MAX_SECONDS
    said = asr.transcribe(heldout_flac)  # as the server: language detected, timestamps, the defaults
    assert said.text and said.segments
    assert all(s.temperature == 0 for s in said.segments)  # no fallback: sampled text differs between processes
    r = post(url, heldout_flac, model="whisper-1")
    assert r.status_code == 200 and r.json() == {"text": said.text.strip()}
    v = post(url, heldout_flac, response_format="verbose_json", **{"timestamp_granularities[]": "segment"}).json()
    assert {k: v[k] for k in ("task", "language", "duration", "text")} == {
        "task": "transcribe", "language": language_name(said.language), "duration": said.duration,
        "text": said.text.strip()}
    assert [set(s) for s in v["segments"]] == [SEGMENT_KEYS] * len(said.segments)
    assert [(s["start"], s["end"], s["text"], s["tokens"]) for s in v["segments"]] == [
        (s.start, s.end, s.text, s.tokens) for s in said.segments]
    assert all(0 <= s["start"] < s["end"] <= v["duration"] + 0.02 for s in v["segments"])
    r = post(url, heldout_flac, response_format="srt")
    assert r.status_code == 200 and r.text == format_transcript(said, "srt") and " --> " in r.text


def test_the_servers_options_reach_the_real_transcriber(real_server, asr, heldout_flac):
    url = real_server
    said = asr.transcribe(heldout_flac, language="en", temperature=0.0, initial_prompt="forums heads")
    r = post(url, heldout_flac, language="English", temperature="0", prompt="forums heads")
    assert r.status_code == 200 and r.json() == {"text": said.text.strip()}
    r = post(url, heldout_flac, prompt="<|endoftext|><|notimestamps|>" + "word " * 2000)  # text, however long
    assert r.status_code == 200


REAL_BAD_REQUESTS = {name: BAD_REQUESTS[name] for name in ("not audio", "empty file", "unknown language",
                                                           "temperature over 1")}
REAL_BAD_REQUESTS["audio too long"] = (lambda u: post(u, wav_bytes(6.0, rate=8000)), 413,
                                       "6.0 s exceeds the limit of 5 s")
REAL_BAD_REQUESTS["translation by a model that cannot"] = (lambda u: post(u, endpoint="translations"), 400,
                                                          "cannot translate: it was trained to transcribe only")


@pytest.mark.parametrize("case", list(REAL_BAD_REQUESTS))
def test_bad_requests_to_the_real_model_get_a_4xx_and_it_lives_on(real_server, heldout_flac, case):
    request, status, words = REAL_BAD_REQUESTS[case]
    r = request(real_server)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert post(real_server, heldout_flac).status_code == 200
