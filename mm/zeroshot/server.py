"""A small JSON API for zero-shot classification: one uploaded image against the labels you send.

    python -m mm.zeroshot.server --checkpoint runs/clip          # http://127.0.0.1:8000/docs
    curl -F image=@cat.jpg -F labels="cat,dog,car" http://127.0.0.1:8000/classify

Endpoints: POST /classify (multipart: image file, labels as "a,b" or a JSON list, optional top_k and
templates as a JSON list or one per line, each with one bare {} for the label), GET /health, OpenAPI
at /docs and /openapi.json. Binds to 127.0.0.1 unless --host says otherwise. Bad input gets a 4xx
with {"detail": message}:
    400 labels or templates unusable (none, too many, too long, malformed; a template other than
        exactly one bare {} placeholder, such as "{} {x}", "{0}", "{.attr}" or "{:>9}")
    413 request or image file over the size limit, or an image with too many pixels (decompression bomb)
    415 the upload is not a decodable image
    422 a required field is missing or of the wrong type (FastAPI's own validation)
Anything unexpected is a JSON 500 without a trace (the trace goes to the server log).
"""
from __future__ import annotations

import argparse
import json

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from pydantic import BaseModel

from mm.cli import add_serve_arguments
from mm.http import LimitRequestBody, internal_error
from mm.zeroshot.args import add_model_args, load_classifier
from mm.zeroshot.classifier import DEFAULT_TEMPLATES, ZeroShotClassifier, check_labels
from mm.zeroshot.inputs import (DEFAULT_MAX_PIXELS, ImageTooLarge, NotAnImage, labels_from_text, open_image,
                               parse_templates)

FORM_OVERHEAD = 64 * 1024  # bytes a multipart body may carry beyond the image: boundaries, labels, templates
MAX_LABEL_CHARS = 200  # per label or template; the tokenizer keeps far fewer tokens anyway
MAX_TEMPLATES = 16
TEMPLATES_HELP = (f"prompts as a JSON list or one per line (never split on commas), each with one bare {{}} where "
                  f"the label goes; default {json.dumps(list(DEFAULT_TEMPLATES[:2]))}, ...")


class Prediction(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]  # best first
    model: str


def parse_form_labels(labels: str, templates: str | None, max_labels: int) -> tuple[list[str], list[str] | None]:
    """Validated (labels, templates) from the form fields; HTTPException(400) says what is wrong."""
    try:
        label_list = labels_from_text(labels, max_labels)
        template_list = parse_templates(templates) if templates else None  # commas belong to the prompt
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if template_list is not None and len(template_list) > MAX_TEMPLATES:
        raise HTTPException(400, f"too many templates: {len(template_list)} (at most {MAX_TEMPLATES})")
    if any(len(x) > MAX_LABEL_CHARS for x in label_list + (template_list or [])):
        raise HTTPException(400, f"labels and templates are limited to {MAX_LABEL_CHARS} characters each")
    try:  # the classifier's own checks, answered here as a 400 rather than raised inside the handler
        check_labels(label_list, template_list or DEFAULT_TEMPLATES)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return label_list, template_list


def read_upload(image: UploadFile, max_bytes: int, max_pixels: int):
    """The uploaded file as a decoded RGB image; 413 when too big (bytes or pixels), 415 when not an image."""
    data = image.file.read(max_bytes + 1)  # never more than one byte past the limit
    if len(data) > max_bytes:
        raise HTTPException(413, f"image file over the limit of {max_bytes:,} bytes")
    if not data:
        raise HTTPException(415, "the uploaded image file is empty")
    try:
        return open_image(data, max_pixels)
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except NotAnImage as e:
        raise HTTPException(415, str(e)) from None


def create_app(classifier: ZeroShotClassifier, max_labels: int = 64, max_upload_bytes: int = 8_000_000,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The FastAPI app serving `classifier`."""
    app = FastAPI(title="mm zero-shot classification",
                  description="Classify an image against labels you choose, with a CLIP model.")
    app.add_middleware(LimitRequestBody, max_bytes=max_upload_bytes + FORM_OVERHEAD)
    app.add_exception_handler(Exception, internal_error)

    @app.get("/health")
    def health() -> dict:
        """Liveness, and what this server runs and accepts."""
        return {"status": "ok", "model": classifier.name, "device": str(classifier.device),
                "max_labels": max_labels, "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}

    # A plain `def`: FastAPI runs it in a worker thread, so inference never blocks the event loop.
    @app.post("/classify", response_model=ClassifyResponse,
              responses={400: {"description": "unusable labels or templates"},
                         413: {"description": "upload or image too large"},
                         415: {"description": "not an image"}})
    def classify(image: UploadFile = File(..., description="the image (PNG, JPEG, WebP, ...)"),
                 labels: str = Form(..., description='"cat,dog" or ["cat", "dog"]'),
                 top_k: int = Form(5, ge=1, description="labels to return, best first"),
                 templates: str | None = Form(None, description=TEMPLATES_HELP)):
        """Probabilities of the labels for the image (softmax over the given labels)."""
        label_list, template_list = parse_form_labels(labels, templates, max_labels)
        img = read_upload(image, max_upload_bytes, max_pixels)
        ranked = classifier.classify(img, label_list, template_list, top_k=top_k)[0]
        return {"predictions": [{"label": lab, "probability": p} for lab, p in ranked], "model": classifier.name}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mm.zeroshot.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_serve_arguments(p, port=8000, device=False)  # add_model_args has --device
    p.add_argument("--max-labels", type=int, default=64, help="labels per request (default: %(default)s)")
    p.add_argument("--max-upload-bytes", type=int, default=8_000_000, help="image file size (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="width x height (default: %(default)s)")
    args = p.parse_args(argv)
    clf = load_classifier(args, max_pixels=args.max_pixels)
    app = create_app(clf, args.max_labels, args.max_upload_bytes, args.max_pixels)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
