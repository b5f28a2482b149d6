"""The OpenAI-compatible vision-chat API (mm/vlm/server.py): OpenAI's request fields and answer shapes, streaming as
Server-Sent Events, the concurrency cap, and a matrix of hostile requests, each against a real uvicorn server. The
servers run in threads of this process around tests.vlm_fakes' stand-in chat (fast, and the tests can hold a
generation mid-way); one more is started as a user starts it, `python -m mm.vlm.server`, in a subprocess."""
import base64
import contextlib
import json
import threading
import time

import pytest
import requests

from mm.vlm.server import create_app
from tests.helpers import ROOT, free_port
from tests.vlm_fakes import FakeVisionChat, install_fake_chat, png_data_url
from tests.zeroshot_fixtures import png_declaring, python, serve

MAX_BODY = 200_000  # bytes; small, so the tests go over it cheaply
MAX_TOKENS = 64  # the server's cap on max_tokens
RED, BLUE = (220, 30, 30), (30, 60, 220)
ASKED = "what colour is it?"
ANSWER = f"I see a red image. You asked: {ASKED}"
# `python -m mm.vlm.server`, with tests.vlm_fakes' chat standing in for mm.vlm.inference's
SERVE_FAKE = ("import sys, types; from tests import vlm_fakes as f; m = types.ModuleType('mm.vlm.inference'); "
              "m.VisionChat, m.PromptTooLong = f.FakeVisionChat, f.PromptTooLong; sys.modules[m.__name__] = m; "
              "from mm.vlm.server import main; sys.exit(main(sys.argv[1:]))")


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on a free port of 127.0.0.1, in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def wait_until(condition) -> None:
    """Poll `condition` until it holds (no deadline: pytest's own timeout, if any, is the guard)."""
    while not condition():
        time.sleep(0.01)


@pytest.fixture(scope="module")
def fake():
    return FakeVisionChat(max_images=2, max_prompt_tokens=120, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def server(fake):
    with running(create_app(fake, max_body_bytes=MAX_BODY, max_tokens_cap=MAX_TOKENS)) as url:
        yield url


def user(*parts, text: str = ASKED) -> list[dict]:
    """One user message: image urls, then the question."""
    content = [{"type": "image_url", "image_url": {"url": u}} for u in parts] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def post(url: str, body=None, **fields) -> requests.Response:
    body = {"model": "mm", "messages": user(png_data_url(RED)), **fields} if body is None else body
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"},
                         stream=True)  # read as it comes: a streamed answer's events one by one


def read_events(response: requests.Response) -> list:
    """The SSE stream's data payloads, parsed ("[DONE]" kept as is)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


# ---------------------------------------------------------------- good requests

def test_a_data_url_image_gets_an_openai_chat_completion(server, fake):
    r = post(server, max_tokens=50, temperature=0.5, top_p=0.9)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "fake-vlm"
    assert abs(body["created"] - time.time()) < 3600
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    words = len(ANSWER.split())
    # fake prompt: 4 words + 4 per message + 16 per image
    assert body["usage"] == {"prompt_tokens": 24, "completion_tokens": words, "total_tokens": 24 + words}
    call = fake.calls[-1]
    assert (call["kind"], call["max_new_tokens"], call["temperature"], call["top_p"]) == ("chat", 50, 0.5, 0.9)


def test_defaults_a_system_prompt_several_turns_and_a_cut_answer(server, fake):
    messages = [{"role": "system", "content": "Be brief."}, *user(png_data_url(BLUE), text="hi"),
                {"role": "assistant", "content": "Hello."}, *user(png_data_url(RED))]
    body = post(server, {"messages": messages}).json()  # no model, no options: greedy, the default length
    assert body["choices"][0]["message"]["content"] == f"I see a blue image and a red image. You asked: {ASKED}"
    assert (fake.calls[-1]["temperature"], fake.calls[-1]["top_p"], fake.calls[-1]["max_new_tokens"]) == (0.0, 1.0, 64)
    body = post(server, max_completion_tokens=3).json()
    assert body["choices"][0]["message"]["content"] == "I see a"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


def test_local_paths_and_file_urls_are_read_on_this_machine(server, tmp_path):
    from PIL import Image

    path = tmp_path / "blue.png"
    Image.new("RGB", (20, 20), BLUE).save(path)
    for url in (str(path), path.as_uri()):
        r = post(server, messages=user(url))
        assert r.status_code == 200 and "a blue image" in r.json()["choices"][0]["message"]["content"]


def test_streaming_gives_the_same_text_as_chunks_then_done(server):
    plain = post(server).json()["choices"][0]["message"]["content"]
    with post(server, stream=True) as r:
        assert r.status_code == 200
        events = read_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(pieces) == len(plain.split()) and "".join(pieces) == plain == streamed_text(events)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_usage_and_a_cut_stream(server):
    with post(server, stream=True, max_tokens=2, stream_options={"include_usage": True}) as r:
        events = read_events(r)
    assert streamed_text(events) == "I see"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == {"prompt_tokens": 24, "completion_tokens": 2,
                                                                  "total_tokens": 26}


def test_a_stream_without_a_reply_ends_with_stop_and_no_usage():
    """VisionChat.stream need not return a ChatReply: then the finish reason is "stop" and usage is left out."""
    chat = FakeVisionChat(stream_returns_reply=False)
    with running(create_app(chat)) as url, post(url, stream=True, max_tokens=2,
                                                stream_options={"include_usage": True}) as r:
        events = read_events(r)
    assert streamed_text(events) == "I see" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in e for e in events[:-1])


def test_pieces_arrive_while_the_answer_is_still_being_generated():
    chat = FakeVisionChat(hold_after=2)
    with running(create_app(chat)) as url, post(url, stream=True) as r:
        lines = (line for line in r.iter_lines(decode_unicode=True) if line)
        seen = [json.loads(next(lines)[len("data: "):]) for _ in range(3)]  # role, then two pieces
        assert "".join(e["choices"][0]["delta"]["content"] for e in seen) == "I see"
        assert chat.active == 1  # held after two pieces: they came before the rest was made
        chat.release()
        rest = [line for line in lines]
    assert rest[-1] == "data: [DONE]" and len(rest) == len(ANSWER.split()) - 2 + 2


def test_models_and_health(server):
    assert requests.get(f"{server}/v1/models").json() == {
        "object": "list", "data": [{"id": "fake-vlm", "object": "model", "created": 0, "owned_by": "mm"}]}
    health = requests.get(f"{server}/health").json()
    assert health["status"] == "ok" and (health["max_images"], health["max_prompt_tokens"]) == (2, 120)
    assert (health["max_body_bytes"], health["max_tokens"], health["running"], health["waiting"]) == (
        MAX_BODY, MAX_TOKENS, 0, 0)


def test_the_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = user(png_data_url(RED))
    reply = client.chat.completions.create(model="mm", messages=messages, max_tokens=20)
    assert reply.choices[0].message.content == ANSWER and reply.usage.prompt_tokens == 24
    stream = client.chat.completions.create(model="mm", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage.completion_tokens == len(ANSWER.split())
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="mm", messages=[{"role": "robot", "content": "hi"}], stream=True)


# ---------------------------------------------------------------- hostile requests

def text_data_url(text: bytes = b"hello, this is text") -> str:
    return "data:image/png;base64," + base64.b64encode(text).decode()


def bomb_data_url() -> str:
    """A PNG declaring 5000 x 5000 pixels (25 times the fake's limit) in a few hundred bytes."""
    return "data:image/png;base64," + base64.b64encode(png_declaring(5000, 5000, rows=1)).decode()


def chunked_oversized_body():
    yield b'{"messages": [{"role": "user", "content": "'
    for _ in range(30):
        yield b"a" * 10_000
    yield b'"}]}'


IMG = png_data_url(RED)
BAD_REQUESTS = {  # name: (body or bytes or a function of the URL, status, words in the message, param, code)
    "not JSON": (b'{"messages": [', 400, "not valid JSON", None, None),
    "not UTF-8": (b'{"messages": "\xff\xfe"}', 400, "not valid JSON", None, None),
    "a JSON array": ([{"role": "user", "content": "hi"}], 400, "must be a JSON object", None, None),
    "no messages": ({"model": "mm"}, 400, "messages must be a non-empty list", "messages", None),
    "empty messages": ({"messages": []}, 400, "messages must be a non-empty list", "messages", None),
    "messages a string": ({"messages": "hi"}, 400, "messages must be a non-empty list", "messages", None),
    "a message not an object": ({"messages": ["hi"]}, 400, "a message must be an object", "messages", None),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "unknown role 'bot'", "messages", None),
    "unknown key": ({"messages": [{"role": "user", "content": "hi", "mood": 1}]}, 400, "unsupported key(s) mood",
                    "messages", None),
    "no content": ({"messages": [{"role": "user"}]}, 400, "messages[0]: no content", "messages", None),
    "content a number": ({"messages": [{"role": "user", "content": 7}]}, 400, "must be a string or a list of parts",
                         "messages", None),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
                          "unknown part type 'input_audio'", "messages", None),
    "image_url without url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                              400, "an image_url part needs", "messages", None),
    "image in an assistant message": ({"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}, *user()]}, 400,
        "images are accepted in user messages only", "messages", None),
    "the last message not the user's": ({"messages": [*user(), {"role": "assistant", "content": "Hi."}]}, 400,
                                        "the last message must be from the user", "messages", None),
    "too many images": ({"messages": user(IMG, IMG, IMG)}, 400, "3 images, over the limit of 2", "messages", None),
    "not an image": ({"messages": user(text_data_url())}, 400, "not an image", "messages", "invalid_image"),
    "empty image": ({"messages": user("data:image/png;base64,")}, 400, "not an image", "messages", "invalid_image"),
    "decompression bomb": ({"messages": user(bomb_data_url())}, 400, "5000x5000 = 25,000,000 pixels exceeds the "
                           "limit of 1,000,000", "messages", "image_too_large"),
    "bad base64": ({"messages": user("data:image/png;base64,@@@")}, 400, "bad base64", "messages",
                   "invalid_image_url"),
    "missing local file": ({"messages": user("/nonexistent/cat.png")}, 400, "/nonexistent/cat.png: no such file",
                           "messages", "invalid_image_url"),
    "relative path": ({"messages": user("cat.png")}, 400, "a relative path", "messages", "invalid_image_url"),
    "http image url": ({"messages": user("http://169.254.169.254/latest/meta-data")}, 400,
                       "does not fetch images over http", "messages", "invalid_image_url"),
    "ftp image url": ({"messages": user("ftp://example.com/a.png")}, 400, "unsupported URL scheme 'ftp'",
                      "messages", "invalid_image_url"),
    "prompt too long": ({"messages": user(IMG, text="word " * 200)}, 400, "over the limit of 120", "messages",
                        "context_length_exceeded"),
    "temperature below 0": ({"messages": user(), "temperature": -0.1}, 400, "temperature must be in [0, 2]",
                            "temperature", None),
    "temperature over 2": ({"messages": user(), "temperature": 2.5}, 400, "temperature must be in [0, 2]",
                           "temperature", None),
    "temperature a string": ({"messages": user(), "temperature": "hot"}, 400, "temperature must be a number",
                             "temperature", None),
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
                        "temperature must be a number", "temperature", None),
    "top_p 0": ({"messages": user(), "top_p": 0}, 400, "top_p must be in (0, 1]", "top_p", None),
    "top_p over 1": ({"messages": user(), "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p", None),
    "max_tokens 0": ({"messages": user(), "max_tokens": 0}, 400, f"max_tokens must be in [1, {MAX_TOKENS}]",
                     "max_tokens", None),
    "max_tokens over the cap": ({"messages": user(), "max_completion_tokens": MAX_TOKENS + 1}, 400,
                                f"max_completion_tokens must be in [1, {MAX_TOKENS}]", "max_completion_tokens", None),
    "max_tokens a float": ({"messages": user(), "max_tokens": 2.5}, 400, "max_tokens must be an integer",
                           "max_tokens", None),
    "two different max tokens": ({"messages": user(), "max_tokens": 5, "max_completion_tokens": 6}, 400,
                                 "not both", "max_tokens", None),
    "n 2": ({"messages": user(), "n": 2}, 400, "n must be 1", "n", None),
    "tools": ({"messages": user(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
              "tools: tool calls is not supported", "tools", None),
    "stop sequences": ({"messages": user(), "stop": ["\n"]}, 400, "stop: stop sequences is not supported", "stop",
                       None),
    "JSON mode": ({"messages": user(), "response_format": {"type": "json_object"}}, 400, "structured output",
                  "response_format", None),
    "stream not a boolean": ({"messages": user(), "stream": "yes"}, 400, "stream must be true or false", "stream",
                             None),
    "body over the limit": ({"messages": user(text="a" * MAX_BODY)}, 413, "request body over the limit of 200,000",
                            None, None),
    "chunked body over the limit": (lambda u: requests.post(f"{u}/v1/chat/completions", data=chunked_oversized_body(),
                                                            headers={"Content-Type": "application/json"}),
                                    413, "request body over the limit of 200,000", None, None),
    "unknown path": (lambda u: requests.post(f"{u}/v1/completions", json={"prompt": "hi"}), 404, "Not Found", None,
                     None),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_in_openai_shape_before_any_generation(server, fake, case, stream):
    body, status, words, param, code = BAD_REQUESTS[case]
    if isinstance(body, dict) and stream:
        body = {"stream": True, **body}
    generated = len(fake.calls)
    r = body(server) if callable(body) else post(server, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and "Traceback" not in r.text
    error = r.json()["error"]
    assert words in error["message"], error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert r.json()["detail"] == error["message"]
    assert len(fake.calls) == generated  # refused before the model ran
    assert post(server).json()["choices"][0]["message"]["content"] == ANSWER  # and the server lives on


def test_a_server_for_other_machines_reads_no_local_files(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), RED).save(path)
    with running(create_app(FakeVisionChat(), allow_local_images=False)) as url:
        for ref in (str(path), path.as_uri()):
            r = post(url, messages=user(ref))
            assert r.status_code == 400 and "does not read images from its own disk" in r.json()["error"]["message"]
        assert post(url).status_code == 200  # data: URLs still


def test_unexpected_errors_are_a_json_500_without_a_trace():
    class Broken(FakeVisionChat):
        def chat(self, *args, **kwargs):
            raise RuntimeError("secret /srv/internals")

        def stream(self, *args, **kwargs):
            yield "I"
            raise RuntimeError("secret /srv/internals")

    with running(create_app(Broken())) as url:
        r = post(url)
        assert r.status_code == 500 and r.json()["error"] == {
            "message": "internal server error (see the server log)", "type": "server_error", "param": None,
            "code": None}
        with post(url, stream=True) as r:  # the 200 has gone: the error comes as an event
            events = read_events(r)
        assert events[1]["choices"][0]["delta"]["content"] == "I"
        assert events[-1]["error"]["type"] == "server_error" and "secret" not in json.dumps(events)
        assert requests.get(f"{url}/health").json()["running"] == 0


# ---------------------------------------------------------------- concurrency

def test_one_generation_at_a_time_a_bounded_queue_and_a_free_event_loop():
    chat = FakeVisionChat(hold_after=0)  # the first generation waits for chat.release()
    results = {}

    def ask(name, **fields):
        results[name] = post(url, **fields)

    with running(create_app(chat, max_concurrency=1, max_waiting=1)) as url:
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        chat.started.wait()
        health = requests.get(f"{url}/health").json()  # answered while the model is busy
        assert (health["running"], health["waiting"]) == (1, 0)
        second = threading.Thread(target=ask, args=("second",), kwargs={"stream": True})
        second.start()
        wait_until(lambda: requests.get(f"{url}/health").json()["waiting"] == 1)
        third = post(url)  # one running, one waiting: no room
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert "the server is busy" in third.json()["error"]["message"]
        chat.release()
        first.join()
        second.join()
        assert results["first"].json()["choices"][0]["message"]["content"] == ANSWER
        assert streamed_text(read_events(results["second"])) == ANSWER
        assert chat.most_active == 1 and len(chat.calls) == 2
        assert requests.get(f"{url}/health").json()["running"] == 0


def test_several_generations_at_once_when_allowed():
    chat = FakeVisionChat(hold_after=0)
    with running(create_app(chat, max_concurrency=2)) as url:
        threads = [threading.Thread(target=post, args=(url,)) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: chat.active == 2 and requests.get(f"{url}/health").json()["waiting"] == 1)
        chat.release()
        for t in threads:
            t.join()
    assert chat.most_active == 2 and len(chat.calls) == 3


def test_a_client_that_goes_away_stops_its_generation_and_frees_the_slot():
    chat = FakeVisionChat(max_prompt_tokens=10_000, hold_after=2, delay=0.01)
    long_question = " ".join(f"w{i}" for i in range(300))
    with running(create_app(chat, max_concurrency=1)) as url:
        r = post(url, messages=user(text=long_question), stream=True, max_tokens=MAX_TOKENS * 4)
        next(r.iter_lines())
        r.close()  # the client hangs up mid-answer
        chat.release()
        wait_until(lambda: requests.get(f"{url}/health").json()["running"] == 0)
        assert chat.active == 0 and chat.pieces_made < 300  # closed, not run to the end
        assert post(url).status_code == 200


# ---------------------------------------------------------------- command line

@pytest.mark.slow
def test_the_command_binds_localhost_and_serves(tmp_path):
    (tmp_path / "vlm").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with serve(python("-c", SERVE_FAKE, "--model", str(tmp_path / "vlm"), "--port", str(port)), f"{url}/health", log,
               cwd=ROOT):
        assert requests.get(f"{url}/health").json()["model"] == "vlm"
        assert post(url).json()["choices"][0]["message"]["content"] == ANSWER
    assert f"Uvicorn running on {url}" in log.read_text()


def test_main_without_a_model_says_how_to_train_one(monkeypatch, tmp_path, capsys):
    install_fake_chat(monkeypatch)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not serve without a model"))
    from mm.vlm.server import main

    assert main(["--model", str(tmp_path / "nothing"), "--device", "cpu"]) == 1
    assert "Train one with: python recipes/vlm/train.py" in capsys.readouterr().err


def test_main_on_all_interfaces_warns_and_refuses_local_files(monkeypatch, tmp_path, capsys):
    made = install_fake_chat(monkeypatch)
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    from mm.vlm.server import main

    (tmp_path / "vlm").mkdir()
    assert main(["--model", str(tmp_path / "vlm"), "--device", "cpu", "--host", "0.0.0.0", "--max-tokens", "32"]) == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 8000)
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err and made[0].name == "vlm"
    from fastapi.testclient import TestClient

    client = TestClient(served["app"])
    assert client.get("/health").json()["local_images"] is False and client.get("/health").json()["max_tokens"] == 32
    assert main(["--model", str(tmp_path / "vlm"), "--device", "cpu", "--host", "0.0.0.0",
                 "--allow-local-images"]) == 0
    assert TestClient(served["app"]).get("/health").json()["local_images"] is True
