"""Gradio demo: upload an image, type labels, see a bar chart of their probabilities under a CLIP model.

    python demos/zeroshot_app.py                                  # the model recipes/clip/train.py wrote to runs/clip
    python demos/zeroshot_app.py --checkpoint runs/clip --port 7860
    python demos/zeroshot_app.py --model ViT-B-32 --weights vit_b32.pt

Serves on http://127.0.0.1:7860 (only this machine) unless --host says otherwise. The same function
is an API endpoint: gradio_client.Client(url).predict(handle_file("cat.jpg"), "cat, dog", api_name="/classify").
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing

# A local demo has no business phoning home: no usage analytics, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from mm.cli import add_serve_arguments  # noqa: E402
from mm.zeroshot.args import add_model_args, load_classifier  # noqa: E402
from mm.zeroshot.inputs import labels_from_text, open_image  # noqa: E402

EXAMPLE_LABELS = "red circle, blue square, green triangle, yellow star"
UPLOAD_NAME = "the uploaded image"  # how messages call it: never the server's temp path


def upload_path(image: dict | str | None) -> str:
    """The uploaded file's path, from gradio's unprocessed image payload ({"path": ..., "orig_name": ...})
    or a plain path; gr.Error when there is none."""
    import gradio as gr

    if not image:
        raise gr.Error("Upload an image first.")
    path = image.get("path") if isinstance(image, dict) else image
    if not path:  # e.g. only a base64 "data:" URL, which gr.Image would decode whole, unchecked
        raise gr.Error("Send the image as a file upload.")
    return str(path)


def make_predict(classifier, max_labels: int = 64):
    """predict(image payload or path, labels text) -> {label: probability} for every label; gr.Error on bad input."""
    import gradio as gr

    def predict(image: dict | str | None, labels: str) -> dict[str, float]:
        path = upload_path(image)
        try:
            label_list = labels_from_text(labels, max_labels)
            pixels = open_image(path, classifier.max_pixels, name=UPLOAD_NAME)  # header checked before decoding
            ranked = classifier.classify(pixels, label_list, top_k=len(label_list))[0]
        except (ValueError, FileNotFoundError) as e:  # bad labels, NotAnImage, ImageTooLarge: all say what to change
            raise gr.Error(str(e)) from None
        return dict(ranked)

    return predict


def build_demo(classifier, max_labels: int = 64):
    """The Blocks app: image + labels in, a gr.Label (bars of probabilities) out; API name "classify"."""
    import gradio as gr

    with gr.Blocks(title="mm zero-shot classification", analytics_enabled=False) as demo:
        gr.Markdown("## Zero-shot image classification\nUpload an image, type the labels to choose from "
                    f"(comma-separated), press **Classify**. Model: `{classifier.name}`")
        with gr.Row():
            with gr.Column():
                # image_mode=None: gr.Image would otherwise convert (fully decode) any non-RGB upload
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 elem_id="image")
                labels = gr.Textbox(label="Labels", placeholder=EXAMPLE_LABELS, lines=2, elem_id="labels")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                probs = gr.Label(label="Probabilities", num_top_classes=10, elem_id="probabilities")
        # preprocess=False: predict gets the uploaded file's path unopened, so open_image makes every check
        # and words every message. gr.Image's preprocess opens the file with PIL first, and a non-image or
        # empty upload then fails inside gradio with its generic "upstream app has raised an exception".
        # (A gr.Image subclass would do too, but gradio writes a .pyi stub beside any file defining one.)
        gr.on([button.click, labels.submit], make_predict(classifier, max_labels), [image, labels], probs,
              api_name="classify", preprocess=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_serve_arguments(p, port=7860, device=False)  # add_model_args has --device
    p.add_argument("--max-labels", type=int, default=64, help="labels per request (default: %(default)s)")
    args = p.parse_args(argv)
    classifier = load_classifier(args)  # exits with "train one with python recipes/clip/train.py" if missing
    demo = build_demo(classifier, args.max_labels)
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size="10mb")


if __name__ == "__main__":
    main()
