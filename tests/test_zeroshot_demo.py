"""demos/zeroshot_app.py, the Gradio demo: started as a user starts it, driven by gradio_client and by
headless Chromium (Debian's /usr/bin/chromium, never a Playwright download)."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import SUBPROCESS_ENV, free_port
from tests.zeroshot_fixtures import python, serve, shape_png

pytestmark = pytest.mark.slow  # a real server in a subprocess
CHROMIUM = Path("/usr/bin/chromium")
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


def test_gradio_client_sees_a_message_for_bad_input(demo_url, red_png, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo_url, verbose=False)
    with pytest.raises(AppError, match="Type at least one label"):
        client.predict(handle_file(str(red_png)), " , ", api_name="/classify")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(AppError):  # gradio's own image preprocessing refuses it, with a generic message
        client.predict(handle_file(str(tmp_path / "fake.png")), LABELS, api_name="/classify")
    assert client.predict(handle_file(str(red_png)), LABELS, api_name="/classify")["label"] == "red circle"


def chromium_or_skip():
    """Debian's chromium; skip without it, except in CI (env CI set), where its absence is a failure."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    else:
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} not found (bash setup.sh test installs it)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {missing}")
    if missing:
        pytest.skip(missing)


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


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path):
    """No arguments, in a folder with no runs/clip: a message naming the training command, non-zero exit."""
    proc = subprocess.run(python(str(ROOT / "demos" / "zeroshot_app.py")), cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode != 0
    assert "no CLIP checkpoint at runs/clip" in proc.stderr and "python recipes/clip/train.py" in proc.stderr
