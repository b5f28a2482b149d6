"""Zero-shot image classification with CLIP models: a Python API, a CLI (`python -m mm.zeroshot`),
an HTTP API (`python -m mm.zeroshot.server`) and a Gradio demo (demos/zeroshot_app.py).

    from mm.zeroshot import ZeroShotClassifier
    clf = ZeroShotClassifier.from_checkpoint("runs/clip")
    clf.classify("cat.jpg", ["cat", "dog"])   # [[("cat", 0.93), ("dog", 0.07)]]
"""
from mm.zeroshot.inputs import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageTooLarge, NotAnImage, find_images,
                                open_image, parse_labels)

_CLASSIFIER_NAMES = ("DEFAULT_TEMPLATES", "ZeroShotClassifier", "save_confusion_png")

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageTooLarge", "NotAnImage", "find_images", "open_image",
           "parse_labels", *_CLASSIFIER_NAMES]


def __getattr__(name: str):
    # Lazy (PEP 562): the classifier pulls in torch and open_clip (seconds), which the CLI's
    # --help and its "no checkpoint, train one first" message do not need.
    if name in _CLASSIFIER_NAMES:
        from mm.zeroshot import classifier
        return getattr(classifier, name)
    raise AttributeError(f"module 'mm.zeroshot' has no attribute {name!r}")
