"""Zero-shot image classification with a CLIP model: images x free-text labels -> ranked probabilities.

    clf = ZeroShotClassifier.from_checkpoint("runs/clip")
    clf.classify(["cat.jpg", "dog.png"], ["cat", "dog", "car"], top_k=2)
    # [[("cat", 0.91), ("dog", 0.07)], [("dog", 0.88), ("cat", 0.10)]]

A label set's text head ([C, D], one unit vector per label averaged over the prompt templates)
is computed once and kept in a small LRU cache, so repeated calls with the same labels only
encode images. Probabilities are softmax(logit_scale * cosine similarity) over the given labels.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from mm.checkpoint import CheckpointError
from mm.clip.evaluate import build_zero_shot_head, encode_images, topk_correct
from mm.clip.model import create_clip, load_clip
from mm.zeroshot.inputs import (DEFAULT_MAX_PIXELS, ImageTooLarge, NotAnImage, check_templates, find_images,
                                open_image)

# A few of OpenAI's ImageNet prompts (Radford et al. 2021, "prompt engineering and ensembling").
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)

ImageInput = str | Path | Image.Image | torch.Tensor


def pick_device(device: str | torch.device | None) -> torch.device:
    """`device`, or the first GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def check_labels(labels: Sequence[str], templates: Sequence[str]) -> None:
    """Raise ValueError for an empty, blank or repeated label, or an unusable template (see check_templates)."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of strings, not one string ({labels!r}); see parse_labels")
    if not labels:
        raise ValueError("no labels given: pass at least one label to classify against")
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        raise ValueError(f"labels must be non-empty strings, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat: {sorted({x for x in labels if list(labels).count(x) > 1})}")
    check_templates(templates, labels)


def as_batch(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or many -> a list of single images (a [B, 3, H, W] tensor becomes B items)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W], got shape {tuple(images.shape)}")
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images)


class ZeroShotClassifier:
    """A CLIP model, its preprocessing and tokenizer, ready to classify images against any labels."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, device: str | torch.device | None = None,
                 name: str = "clip", max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 16):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess, self.tokenizer, self.name = preprocess, tokenizer, name
        self.max_pixels = max_pixels  # images from files above this are refused (decompression bombs)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)  # (H, W) the model takes
        self.cache_size = cache_size
        self._heads: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the server and the demo call from worker threads
        self.heads_built = 0  # label sets encoded so far (cache misses)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: str | Path = "runs/clip", device: str | torch.device | None = None,
                        **kwargs) -> "ZeroShotClassifier":
        """From anything recipes/clip/train.py writes: a run folder, its export/ folder or a step_*.pt file.

        Raises FileNotFoundError when there is none, and CheckpointError (a ValueError) naming the file
        when it is refused (it holds Python objects, so loading it could run code), corrupt, or does not
        describe a CLIP model.
        """
        try:  # on the CPU: here a RuntimeError is the checkpoint's, never the GPU's (__init__ moves it)
            model, preprocess, tokenizer = load_clip(path, "cpu")
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            # open_clip's factory and load_state_dict meet a foreign or incomplete model_cfg / weights
            raise CheckpointError(f"{path}: cannot rebuild a CLIP model from it ({type(e).__name__}: "
                                  f"{str(e)[:300]}); is it a checkpoint recipes/clip/train.py wrote?") from None
        return cls(model, preprocess, tokenizer, device, name=str(path), **kwargs)

    @classmethod
    def from_pretrained(cls, model_name: str, weights_path: str | Path, device: str | torch.device | None = None,
                        **kwargs) -> "ZeroShotClassifier":
        """An open_clip architecture ("ViT-B-32", "mm-test-micro", a .json config) with a local weights file."""
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"{weights_path}: no such weights file")
        model, _, preprocess, tokenizer, _ = create_clip(model_name, str(weights_path))
        return cls(model, preprocess, tokenizer, device, name=f"{model_name}:{weights_path}", **kwargs)

    # ------------------------------------------------------------------ text side

    def text_head(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """[C, D] unit vectors, one per label (mean over templates); cached per (labels, templates)."""
        check_labels(labels, templates or DEFAULT_TEMPLATES)  # before tuple(), which splits one string into chars
        templates = tuple(templates or DEFAULT_TEMPLATES)
        key = (tuple(labels), templates)
        with self._lock:
            if key in self._heads:
                self._heads.move_to_end(key)
                return self._heads[key]
        head = build_zero_shot_head(self.model, self.tokenizer, list(labels), list(templates), self.device)
        with self._lock:
            self._heads[key] = head
            self.heads_built += 1
            while len(self._heads) > self.cache_size:
                self._heads.popitem(last=False)  # least recently used
        return head

    # ------------------------------------------------------------------ image side

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """One image -> [3, H, W] model input. Tensors are taken as already preprocessed
        (what `self.preprocess` returns); paths and PIL images are decoded and preprocessed."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or tuple(image.shape[1:]) != self.image_size:
                raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected a preprocessed "
                                 f"[3, {self.image_size[0]}, {self.image_size[1]}] tensor (use .preprocess(pil_image))")
            return image.float()
        if not isinstance(image, (str, Path, Image.Image)):
            raise ValueError(f"cannot classify a {type(image).__name__}: pass paths, PIL images or tensors")
        return self.preprocess(open_image(image, self.max_pixels))

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput], batch_size: int = 64,
               skip_unreadable: bool = False) -> tuple[torch.Tensor, list[int]]:
        """([N', D] unit image embeddings, indices of the N' images used), `batch_size` at a time.

        skip_unreadable: leave out files that are not decodable images instead of raising.
        """
        feats, kept = [], []
        for start in range(0, len(images), batch_size):
            batch, idx = [], []
            for i, image in enumerate(images[start:start + batch_size], start):
                try:
                    batch.append(self.pixels(image))
                except (NotAnImage, ImageTooLarge):
                    if not skip_unreadable:
                        raise
                    continue
                idx.append(i)
            if batch:
                feats.append(encode_images(self.model, torch.stack(batch).to(self.device)))
                kept += idx
        return (torch.cat(feats) if feats else torch.empty(0, 0, device=self.device)), kept

    # ------------------------------------------------------------------ classification

    def probabilities(self, image_features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """[N, D] image embeddings x [C, D] head -> [N, C] softmax(logit_scale * cosine) over the labels."""
        scale = self.model.logit_scale.exp().float()
        return (scale * image_features @ head.T).softmax(dim=-1)

    def classify(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str],
                 templates: Sequence[str] | None = None, top_k: int = 5,
                 batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """For each image, its `top_k` most probable labels as (label, probability), best first.

        images: a path, PIL image, preprocessed [3, H, W] tensor, a [B, 3, H, W] tensor, or a list of these.
        templates: prompts with one bare '{}' for the label (default DEFAULT_TEMPLATES); see check_templates.
        Always returns one list per image, also for a single image.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        head = self.text_head(labels, templates)
        feats, _ = self.encode(as_batch(images), batch_size)
        probs = self.probabilities(feats, head).cpu()
        values, indices = probs.topk(min(top_k, len(labels)), dim=-1)
        return [[(labels[j], float(p)) for p, j in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]

    # ------------------------------------------------------------------ evaluation

    def evaluate_folder(self, folder: str | Path, labels: Sequence[str] | None = None,
                        templates: Sequence[str] | None = None, out_png: str | Path | None = None,
                        batch_size: int = 64) -> dict[str, Any]:
        """Top-1/top-5 accuracy and a confusion matrix on a folder with one subfolder of images per class.

        labels: the text for each class, in the sorted order of the subfolders
                (default: the subfolder names with '_' read as a space: red_circle -> "red circle").
        out_png: where to save the confusion matrix picture (rows: true class, columns: predicted).
        Files that are not decodable images are skipped and counted under "skipped".
        """
        class_dirs, labels = list_class_folders(folder, labels)
        paths, targets = [], []
        for c, d in enumerate(class_dirs):
            found = find_images([d])
            paths += found
            targets += [c] * len(found)
        feats, kept = self.encode(paths, batch_size, skip_unreadable=True)
        if not kept:
            raise ValueError(f"{folder}: no readable images in its class subfolders")
        targets = torch.tensor([targets[i] for i in kept])
        probs = self.probabilities(feats, self.text_head(labels, templates)).cpu()
        result = accuracy_report(probs, targets, labels)
        result["skipped"] = [str(paths[i]) for i in sorted(set(range(len(paths))) - set(kept))]
        if out_png is not None:
            result["confusion_png"] = str(save_confusion_png(result["confusion"], labels, out_png))
        return result


def list_class_folders(folder: str | Path, labels: Sequence[str] | None) -> tuple[list[Path], list[str]]:
    """(sorted class subfolders of `folder`, one label per subfolder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{folder}: expected one subfolder of images per class, found none")
    if labels is None:
        labels = [d.name.replace("_", " ") for d in class_dirs]
    if len(labels) != len(class_dirs):
        raise ValueError(f"{len(labels)} labels for {len(class_dirs)} class folders "
                         f"({', '.join(d.name for d in class_dirs)}); give one label per folder, in sorted order")
    return class_dirs, list(labels)


def accuracy_report(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """probs [N, C], targets [N] -> top1, top5, n, per-class accuracy and the [C, C] confusion counts."""
    n, c = probs.shape
    hits = topk_correct(probs, targets, ks=(1, 5))
    pred = probs.argmax(dim=1)
    confusion = torch.bincount(targets * c + pred, minlength=c * c).view(c, c)  # [true, predicted]
    per_class = {}
    for i, label in enumerate(labels):
        total = int(confusion[i].sum())
        per_class[label] = {"n": total, "top1": (int(confusion[i, i]) / total) if total else None}
    return {"top1": hits[1] / n, "top5": hits[5] / n, "n": n, "labels": list(labels),
            "per_class": per_class, "confusion": confusion.tolist()}


def save_confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path) -> Path:
    """Draw the [C, C] confusion counts (rows: true, columns: predicted) as a PNG heat map."""
    # Figure without pyplot renders through Agg and touches no global backend state, so it
    # is safe from server threads and on machines without a display.
    from matplotlib.figure import Figure

    c = len(labels)
    side = min(4 + 0.35 * c, 30)  # inches; labels stay legible up to ~80 classes
    fig = Figure(figsize=(side, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(torch.tensor(confusion, dtype=torch.float).numpy(), cmap="Blues")
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title="zero-shot confusion matrix")
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    if c <= 20:  # counts in the cells only while they fit
        for i in range(c):
            for j in range(c):
                if confusion[i][j]:
                    ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

