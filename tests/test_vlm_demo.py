"""demos/vlm_app.py, the Gradio vision Q&A playground: launched in this process around tests.vlm_fakes' stand-in chat
(which names the colour of the images it is given, and can be held mid-answer), then driven by gradio_client and by
headless Chromium (Debian's /usr/bin/chromium, never a Playwright download)."""
import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import CHROMIUM, ROOT, chromium_or_skip, free_port
from tests.vlm_fakes import FakeVisionChat, install_fake_chat
from tests.zeroshot_fixtures import png_declaring

APP = ROOT / "demos" / "vlm_app.py"
MAX_FILE_SIZE = "300kb"  # 307,200 bytes
TRAIN_COMMAND = "python recipes/vlm/train.py"
QUESTION = "What colour is it?"
ANSWER = f"I see a red image. You asked: {QUESTION}"


def load_app():
    spec = importlib.util.spec_from_file_location("vlm_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def fake():
    return FakeVisionChat(max_images=1, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def demo(app, fake):
    """The URL of the playground serving `fake`, queued and limited as main() does it."""
    demo = app.build_app(fake)
    demo.queue(default_concurrency_limit=1, max_size=app.QUEUE_SIZE)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            max_file_size=MAX_FILE_SIZE)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (24, 24), (220, 30, 30)).save(folder / "red.png")
    (folder / "notes.png").write_text("not an image at all\n")
    (folder / "bomb.png").write_bytes(png_declaring(5000, 5000, rows=1))  # 25 Mpx declared in a few hundred bytes
    Image.effect_noise((400, 400), 64).convert("RGB").save(folder / "big.bmp")  # 480 kB: over the upload limit
    return {p.stem: p for p in folder.iterdir()}


def ask(url: str, text: str, image: Path | None = None, temperature=0.0, max_tokens=64):
    """The /chat endpoint's job: iterate it for the answer as it grows; .result() raises the app's error."""
    from gradio_client import Client, handle_file

    files = [handle_file(str(image))] if image else []
    return Client(url, verbose=False).submit({"text": text, "files": files}, temperature, max_tokens,
                                             api_name="/chat")


# ---------------------------------------------------------------- through the API

def test_an_answer_streams_back_growing(demo, fake, images):
    job = ask(demo, QUESTION, images["red"], temperature=0.3, max_tokens=40)
    partial = list(job)  # each update: the answer so far
    assert partial[-1] == ANSWER and len(partial) == len(ANSWER.split())
    assert all(ANSWER.startswith(p) and len(p) < len(q) for p, q in zip(partial, partial[1:]))
    call = fake.calls[-1]
    assert (call["kind"], call["colours"], call["question"]) == ("stream", ["red"], QUESTION)
    assert (call["temperature"], call["max_new_tokens"]) == (0.3, 40)
    assert list(ask(demo, QUESTION, images["red"], max_tokens=2))[-1] == "I see"


BAD = {  # what is sent -> words the refusal holds
    ("notes", 0.0, 64): "the uploaded image: not an image",
    ("bomb", 0.0, 64): "the uploaded image: 5000x5000 = 25,000,000 pixels exceeds the limit of 1,000,000",
    ("red", 2.5, 64): "Value 2.5 is greater than maximum value 2.0",  # gradio's slider checks its range
    ("red", 0.0, 0): "Value 0 is less than minimum value 1",
    ("red", 0.0, 3.5): "max tokens: a whole number from 1 to 512",
    (None, 0.0, 64): "Type a question",
}


def test_bad_uploads_and_settings_get_a_clear_message_and_the_app_keeps_working(demo, fake, images):
    from gradio_client.exceptions import AppError

    for (image, temperature, max_tokens), words in BAD.items():
        generated = len(fake.calls)
        with pytest.raises(AppError) as e:  # not gradio's generic "The upstream Gradio app has raised an exception"
            text = QUESTION if image else " "
            ask(demo, text, images.get(image), temperature, max_tokens).result()
        assert words in str(e.value), str(e.value)
        assert "/tmp" not in str(e.value) and "gradio" not in str(e.value)  # no server paths
        assert len(fake.calls) == generated  # refused before the model ran
        assert list(ask(demo, QUESTION, images["red"]))[-1] == ANSWER


def test_an_upload_over_the_size_limit_is_refused_before_it_is_stored(demo, images):
    import requests

    with pytest.raises(ValueError, match="exceeds the maximum file size of 307200 bytes"):  # gradio_client's check
        ask(demo, QUESTION, images["big"]).result()
    response = requests.post(f"{demo}gradio_api/upload", files={"files": ("big.bmp", images["big"].read_bytes())})
    assert response.status_code == 413 and "307200 bytes" in response.text  # the server's own, for other clients


# ---------------------------------------------------------------- the conversation as OpenAI messages

def test_history_becomes_openai_messages_with_the_image_in_the_first_turn(app):
    history = [  # gradio 6's normalised history: an upload and its question, the answer
        {"role": "user", "content": [{"type": "file", "file": {"path": "/cache/a/red.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}], "metadata": None},
    ]
    assert app.to_messages(history, {"text": "And the shape?", "files": []}) == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/cache/a/red.png"}},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]}]
    older = [{"role": "user", "content": [{"path": "/c/b.png"}, "Hi"]}, {"role": "assistant", "content": "Hello"}]
    assert app.to_messages(older, {"text": "", "files": [{"path": "/c/d.png"}]}) == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/c/b.png"}},
                                     {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/c/d.png"}}]}]


def test_a_second_image_over_the_models_limit_and_errors_name_no_server_path(app, images, tmp_path):
    from gradio.exceptions import Error

    respond = app.make_respond(FakeVisionChat(max_images=1, max_prompt_tokens=30), "runs/vlm")
    red = str(images["red"])
    history = [{"role": "user", "content": [{"path": red}, "What?"]}, {"role": "assistant", "content": "Red."}]
    with pytest.raises(Error, match=r"at most 1 image\(s\) per conversation. Clear the chat"):
        list(respond({"text": "And this?", "files": [red]}, history, 0.0, 8))
    with pytest.raises(Error, match="over the limit of 30. Clear the chat"):  # the prompt too long: start anew
        list(respond({"text": "word " * 40, "files": []}, history, 0.0, 8))
    gone = str(tmp_path / "gradio" / "f00" / "gone.png")
    with pytest.raises(Error) as e:
        list(respond({"text": "And now?", "files": []}, [{"role": "user", "content": [{"path": gone}, "Hi"]}], 0, 8))
    assert "the uploaded image: no such file" in e.value.message and str(tmp_path) not in e.value.message


# ---------------------------------------------------------------- in a browser

def open_page(pw, url: str):
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                 args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = browser.new_page()
    page.set_default_timeout(120_000)  # generous hang guards, not speed limits
    # Only the demo itself: fonts or anything else off this machine would just hang offline.
    page.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    page.goto(url)
    return browser, page


def test_in_a_browser_upload_ask_watch_the_answer_stream_follow_up_and_clear(demo, fake, images, tmp_path):
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    fake.hold(after=3)  # the answer stops after "I see a" until released
    with sync_playwright() as pw:
        browser, page = open_page(pw, demo)
        try:
            chatbot, question = page.locator("#chatbot"), page.locator("#question textarea")
            page.locator("#question input[type=file]").set_input_files(str(images["red"]))
            expect(page.locator("#question img")).to_be_visible()  # uploaded: sending earlier sends no image
            question.fill(QUESTION)
            question.press("Enter")
            expect(chatbot).to_contain_text("I see a")  # part of the answer, shown while the rest is made
            assert "You asked" not in chatbot.inner_text() and fake.active == 1
            page.screenshot(path=str(tmp_path / "vlm_demo_streaming.png"), full_page=True)
            fake.release()
            expect(chatbot).to_contain_text(ANSWER)
            question.fill("And now?")  # a follow-up: the image of the first turn still goes with it
            question.press("Enter")
            expect(chatbot).to_contain_text("I see a red image. You asked: And now?")
            assert fake.calls[-1]["colours"] == ["red"]
            page.screenshot(path=str(tmp_path / "vlm_demo.png"), full_page=True)
            page.locator("#chatbot button[aria-label='Clear']").click()
            expect(chatbot).not_to_contain_text("You asked")
        finally:
            fake.release()
            browser.close()
    for shot in ("vlm_demo_streaming.png", "vlm_demo.png"):
        assert (tmp_path / shot).stat().st_size > 10_000


# ---------------------------------------------------------------- without a model, and the command line

def test_without_a_model_the_page_and_the_chat_say_how_to_train_one(app):
    from gradio.exceptions import Error

    demo = app.build_app(None)
    note, = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "no-model"]
    assert TRAIN_COMMAND in note.value and "No vision-chat model at `runs/vlm`" in note.value
    with pytest.raises(Error, match=re.escape(TRAIN_COMMAND)):
        list(app.make_respond(None, "runs/vlm")({"text": "hi", "files": []}, [], 0.0, 8))


def test_main_with_no_arguments_and_no_model_starts_and_says_how_to_train_one(app, monkeypatch, tmp_path, capsys):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(demo=self, **kw))
    monkeypatch.chdir(tmp_path)
    app.main([])
    assert TRAIN_COMMAND in capsys.readouterr().err
    assert any(getattr(b, "elem_id", None) == "no-model" for b in launched["demo"].blocks.values())
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", 7860, False)


def test_main_queues_one_request_at_a_time_binds_localhost_and_limits_uploads(app, monkeypatch, tmp_path):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(demo=self, **kw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "vlm").mkdir(parents=True)
    made = install_fake_chat(monkeypatch)
    app.main(["--max-file-size", "2mb", "--port", "7999", "--device", "cpu"])
    assert made[0].name == "vlm"
    queue = launched["demo"]._queue
    assert queue.default_concurrency_limit == 1 and queue.max_size == 16
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", 7999, False)
    assert launched["max_file_size"] == 2 * 1024 ** 2


def test_a_missing_model_named_on_the_command_line_is_an_error(app, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        app.main(["--model", str(tmp_path / "typo")])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.main(["--max-file-size", "lots"])
    assert "give a size such as 25mb" in capsys.readouterr().err
