"""demos/zeroshot_app.py, the Gradio demo: started as a user starts it, driven by gradio_client and by
headless Chromium (Debian's /usr/bin/chromium, never a Playwright download)."""
import asyncio
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import CHROMIUM, SUBPROCESS_ENV, chromium_or_skip, free_port
from tests.zeroshot_fixtures import png_declaring, python, serve, shape_png, write_hostile_checkpoint

pytestmark = pytest.mark.slow  # a real server in a subprocess
LABELS = "red circle, blue square"


@pytest.fixture(scope="module")
def demo_url(trained_clip, tmp_path_factory):
    """URL of `python demos/zeroshot_app.py --port P` run in a folder whose runs/clip is the trained run,
    so the demo finds its checkpoint the way it does after `python recipes/clip/train.py`."""
    work = tmp_path_factory.mktemp("demo")
    (work / "runs").mkdir()
    (work / "runs" / "clip").symlink_to(trained_clip, target_is_directory=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with serve(python(str(ROOT / "demos" / "zeroshot_app.py"), "--port", str(port)), url, work / "demo.log", cwd=work):
        yield url


@pytest.fixture(scope="module")
def red_png(tmp_path_factory) -> Path:
    return shape_png(tmp_path_factory.mktemp("img") / "red.png", "red", "circle")


def test_gradio_client_gets_probabilities_for_typed_labels(demo_url, red_png):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    result = client.predict(handle_file(str(red_png)), LABELS, api_name="/classify")
    assert result["label"] == "red circle"
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert set(confidences) == {"red circle", "blue square"}
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{"WxH": (path, words our refusal holds)} for RGBA PNG decompression bombs, which gr.Image
    converts (decodes in full) unless image_mode=None.

    8000x8000: 64 MP (256 MB decoded) in ~250 kB, over the demo's 50 MP limit, under PIL's own guard.
    14000x12000: 168 MP in ~650 kB, the upload that cost 10.5 s and 446 MB before it was refused.
    """
    folder = tmp_path_factory.mktemp("bombs")
    sizes = {(8000, 8000): "exceeds the limit of 50,000,000", (14000, 12000): "too large"}  # ours / PIL's guard
    out = {}
    for (w, h), words in sizes.items():
        path = folder / f"{w}x{h}.png"
        path.write_bytes(png_declaring(w, h, rgba=True))
        out[path.stem] = (path, words)
    return out


def load_demo_module():
    spec = importlib.util.spec_from_file_location("zeroshot_app", ROOT / "demos" / "zeroshot_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gradio_cache_dirs() -> list[str]:
    """Where gradio keeps uploads, which no message may show."""
    return ["/tmp", os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")]


@pytest.mark.parametrize("bomb", ["8000x8000", "14000x12000"])
def test_a_bomb_upload_is_refused_before_any_pixel_is_decoded(classifier, bombs, bomb, monkeypatch, tmp_path):
    """In process, through gradio's own input processing (what the server runs on an upload), then predict."""
    from gradio.exceptions import Error
    from PIL import Image, ImageFile

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # read when the components are made
    demo = load_demo_module().build_demo(classifier)
    block_fn, = demo.fns.values()
    decoded = []

    def load(self):  # count, and refuse: a regression must not cost the 446 MB
        decoded.append(self.size)
        raise AssertionError(f"{self.size} image decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)
    path, words = bombs[bomb]
    payload = {"path": str(path), "orig_name": "bomb.png", "meta": {"_type": "gradio.FileData"}}
    inputs = asyncio.run(demo.preprocess_data(block_fn, [payload, LABELS], None, explicit_call=True))
    assert str(tmp_path / "gradio") in str(inputs[0])  # gradio moved the upload into its cache, unopened
    with pytest.raises(Error, match=re.escape(words)) as e:
        block_fn.fn(*inputs)
    assert decoded == []
    assert str(e.value.message).startswith("the uploaded image:")
    assert not any(d in str(e.value.message) for d in [*gradio_cache_dirs(), str(tmp_path)])


def test_predict_without_a_file_path_says_what_to_send(classifier):
    from gradio.exceptions import Error

    predict = load_demo_module().make_predict(classifier)
    with pytest.raises(Error, match="Upload an image first"):
        predict(None, LABELS)
    with pytest.raises(Error, match="as a file upload"):  # a base64 payload gr.Image would decode unchecked
        predict({"path": None, "url": "data:image/png;base64,iVBORw0KGgo="}, LABELS)


def test_gradio_client_sees_our_message_for_bad_input(demo_url, red_png, bombs, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo_url, verbose=False)
    with pytest.raises(AppError, match="Type at least one label"):
        client.predict(handle_file(str(red_png)), " , ", api_name="/classify")
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    uploads = {tmp_path / "fake.png": "not an image", tmp_path / "empty.png": "not an image", **dict(bombs.values())}
    for path, words in uploads.items():
        with pytest.raises(AppError) as e:  # not gradio's generic "The upstream Gradio app has raised an exception"
            client.predict(handle_file(str(path)), LABELS, api_name="/classify")
        message = str(e.value)
        assert message.startswith("the uploaded image: ") and words in message, (path.name, message)
        assert not any(d in message for d in gradio_cache_dirs()), message
    assert client.predict(handle_file(str(red_png)), LABELS, api_name="/classify")["label"] == "red circle"


def test_in_a_browser_upload_type_labels_and_see_probabilities(demo_url, red_png, tmp_path):
    chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            # Generous hang guards, not speed limits: a slow machine passes, a broken page fails eventually.
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            # Only the demo itself: fonts or anything else off this machine would just hang offline.
            page.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
            page.goto(demo_url)
            page.locator("#image input[type=file]").set_input_files(str(red_png))
            expect(page.locator("#image img")).to_be_visible()  # uploaded: clicking earlier sends no image
            page.locator("#labels textarea").fill(LABELS)
            page.locator("#classify").click()
            output = page.locator("#probabilities")
            expect(output).to_contain_text("red circle")
            expect(output).to_contain_text("blue square")
            expect(output).to_contain_text("%")  # the bars' percentages
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_refuses_to_start_on_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    step = write_hostile_checkpoint(tmp_path / "run", marker)
    proc = subprocess.run(python(str(ROOT / "demos" / "zeroshot_app.py"), "--checkpoint", str(step),
                                 "--port", str(free_port())), cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: {step}: refused" in proc.stderr and "Running on" not in proc.stdout
    assert not marker.exists()


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path):
    """No arguments, in a folder with no runs/clip: a message naming the training command, non-zero exit."""
    proc = subprocess.run(python(str(ROOT / "demos" / "zeroshot_app.py")), cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode != 0
    assert "no CLIP checkpoint at runs/clip" in proc.stderr and "python recipes/clip/train.py" in proc.stderr
