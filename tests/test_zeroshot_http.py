"""The zero-shot HTTP API, against a real uvicorn server started as a user starts it."""
import json
import math
import os
import subprocess

import pytest
import requests

from tests.helpers import ROOT, SUBPROCESS_ENV, free_port
from tests.zeroshot_fixtures import (BAD_TEMPLATES, png_declaring, python, serve, shape_png,
                                     write_hostile_checkpoint)

pytestmark = pytest.mark.slow  # a real server in a subprocess
MAX_UPLOAD = 200_000  # bytes; small, so the tests can go over it cheaply
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(trained_clip, tmp_path_factory):
    """Base URL of `python -m mm.zeroshot.server` on a free port (no --host: it must pick 127.0.0.1)."""
    port, log = free_port(), tmp_path_factory.mktemp("http") / "server.log"
    cmd = python("-m", "mm.zeroshot.server", "--checkpoint", str(trained_clip), "--port", str(port),
                 "--max-upload-bytes", str(MAX_UPLOAD), "--max-pixels", str(MAX_PIXELS), "--max-labels", "8")
    url = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{url}/health", log):
        yield url, log


@pytest.fixture(scope="module")
def red_png(tmp_path_factory) -> bytes:
    return shape_png(tmp_path_factory.mktemp("img") / "red.png", "red", "circle").read_bytes()


def post(url, image: bytes | None, labels: str | None = "red circle, blue square", **fields):
    files = {"image": ("upload.png", image, "image/png")} if image is not None else None
    data = {k: v for k, v in {"labels": labels, **fields}.items() if v is not None}
    return requests.post(f"{url}/classify", files=files, data=data)


def test_health_docs_and_localhost_binding(server):
    url, log = server
    health = requests.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_labels"] == 8 and health["max_upload_bytes"] == MAX_UPLOAD
    spec = requests.get(f"{url}/openapi.json").json()
    assert "post" in spec["paths"]["/classify"] and "get" in spec["paths"]["/health"]
    ref = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(form["properties"]) == {"image", "labels", "top_k", "templates"}
    assert set(form["required"]) == {"image", "labels"}
    assert "swagger" in requests.get(f"{url}/docs").text.lower()
    assert f"Uvicorn running on {url}" in log.read_text()


def test_classifies_an_uploaded_image(server, red_png):
    url, _ = server
    r = post(url, red_png)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds][0] == "red circle" and len(preds) == 2
    assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
    r = post(url, red_png, labels='["blue square", "red circle", "green star"]', top_k="1",
             templates='["a {}", "{}"]')
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == ["red circle"]


def chunked_oversized_body():
    """A well-formed multipart upload sent chunked (no Content-Length), 400 kB of image data."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="labels"\r\n\r\nred\r\n--xyz\r\n'
           b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
    for _ in range(40):
        yield b"\0" * 10_000
    yield b"\r\n--xyz--\r\n"


BAD_REQUESTS = {  # name: (request, expected status, words in the message)
    "not an image": (lambda u, png: post(u, b"GIF89a? no, just text"), 415, "not an image"),
    "empty file": (lambda u, png: post(u, b""), 415, "empty"),
    "truncated png": (lambda u, png: post(u, png[: len(png) // 2]), 415, "could not decode"),
    "empty labels": (lambda u, png: post(u, png, labels=" , ,"), 400, "no labels"),
    "labels not a list": (lambda u, png: post(u, png, labels='["a", 1]'), 400, "list of strings"),
    "too many labels": (lambda u, png: post(u, png, labels=",".join(f"l{i}" for i in range(9))), 400,
                        "too many labels: 9"),
    "label too long": (lambda u, png: post(u, png, labels="x" * 201), 400, "200 characters"),
    "top_k 0": (lambda u, png: post(u, png, top_k="0"), 422, "greater than or equal to 1"),
    "no image field": (lambda u, png: post(u, None), 422, "image"),
    "no labels field": (lambda u, png: post(u, png, labels=None), 422, "labels"),
    "file just over the limit": (lambda u, png: post(u, b"\x89PNG" + b"\0" * MAX_UPLOAD), 413,
                                 f"over the limit of {MAX_UPLOAD:,} bytes"),
    "body far over the limit": (lambda u, png: post(u, b"\0" * 5_000_000), 413, "request body over the limit"),
    "chunked body over the limit": (lambda u, png: requests.post(
        f"{u}/classify", data=chunked_oversized_body(),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 413, "request body over the limit"),
    # 10 gigapixels declared in a few kB: PIL's own guard refuses to open it
    "bomb past PIL's limit": (lambda u, png: post(u, png_declaring(100_000, 100_000, rows=1)), 413, "too large"),
    # 4 megapixels (12 MB decoded) in ~12 kB: under PIL's limit, over the server's --max-pixels
    "bomb past --max-pixels": (lambda u, png: post(u, png_declaring(2000, 2000)), 413, "2000x2000"),
    "too many templates": (lambda u, png: post(u, png, templates=json.dumps([f"{i} {{}}" for i in range(17)])), 400,
                           "too many templates: 17"),
    "templates not a list": (lambda u, png: post(u, png, templates='["a {}", 1]'), 400, "list of strings"),
    "bad template among lines": (lambda u, png: post(u, png, templates="a photo of a {}\n{} {x}"), 400,
                                 "has 2 placeholders"),
}
# Each used to be a 500 (or, for the format spec, 7.6 s and ~120 MB per label before it).
BAD_REQUESTS.update({f"template {t}": (lambda u, png, t=t: post(u, png, templates=json.dumps(["a {}", t])), 400, words)
                     for t, words in BAD_TEMPLATES.items()})


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_lives_on(server, red_png, case):
    url, log = server
    request, status, words = BAD_REQUESTS[case]
    r = request(url, red_png)
    assert r.status_code == status, r.text
    assert words in r.text
    assert r.headers["content-type"] == "application/json" and "Traceback" not in r.text
    assert requests.get(f"{url}/health").status_code == 200
    assert post(url, red_png).status_code == 200  # and still classifies


@pytest.mark.parametrize("templates, as_list", [
    ("a photo of a {}, in the wild", ["a photo of a {}, in the wild"]),  # one template, not two
    ("a photo of a {}, in the wild\n{}, drawn\n", ["a photo of a {}, in the wild", "{}, drawn"]),
    ('["a {}, b", "{}"]', ["a {}, b", "{}"]),
])
def test_templates_are_a_json_list_or_one_per_line_never_split_on_commas(server, red_png, classifier, tmp_path,
                                                                         templates, as_list):
    url, _ = server
    labels = ["red circle", "blue square", "green triangle"]
    r = post(url, red_png, labels=json.dumps(labels), templates=templates)
    assert r.status_code == 200, r.text
    got = {p["label"]: p["probability"] for p in r.json()["predictions"]}
    (tmp_path / "red.png").write_bytes(red_png)

    def log_probs(templates):  # logs: the tiny model's winner is ~0.99999, the others differ in their exponents
        ranked = dict(classifier.classify(tmp_path / "red.png", labels, templates=templates)[0])
        return [math.log(ranked[lab]) for lab in labels]

    assert [math.log(got[lab]) for lab in labels] == pytest.approx(log_probs(as_list), abs=1e-3)
    # and the comparison can tell: templates cut at their commas give other probabilities
    assert log_probs([t.split(",")[0] for t in as_list]) != pytest.approx(log_probs(as_list), abs=1e-3)


def test_refuses_to_start_on_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    step = write_hostile_checkpoint(tmp_path / "run", marker)
    proc = subprocess.run(python("-m", "mm.zeroshot.server", "--checkpoint", str(tmp_path / "run"),
                                 "--port", str(free_port())), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: {step}: refused" in proc.stderr and "Uvicorn running" not in proc.stderr + proc.stdout
    assert not marker.exists()


def test_unexpected_errors_are_a_json_500_without_a_trace(trained_clip):
    from fastapi.testclient import TestClient

    from mm.zeroshot import ZeroShotClassifier
    from mm.zeroshot.server import create_app

    class Broken(ZeroShotClassifier):
        def classify(self, *args, **kwargs):
            raise RuntimeError("secret internals")

    clf = ZeroShotClassifier.from_checkpoint(trained_clip, device="cpu")
    broken = Broken(clf.model, clf.preprocess, clf.tokenizer, "cpu")
    png = png_declaring(8, 8)
    r = TestClient(create_app(broken), raise_server_exceptions=False).post(
        "/classify", files={"image": ("a.png", png, "image/png")}, data={"labels": "a,b"})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error (see the server log)"}
    assert "secret" not in r.text
