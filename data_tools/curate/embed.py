"""CLIP embeddings for curation: images and texts -> L2-normalised float32 numpy rows, batched.

    emb = load_clip_embedder("runs/clip")                                   # our run folder, export or step_*.pt
    emb = load_clip_embedder("open_clip:ViT-B-32", pretrained="/w/b32.pt")   # open_clip weights on disk
    emb.embed_images([pil_a, pil_b])   # [2, D] float32, unit rows
    emb.embed_texts(["a cat", "a dog"])  # [2, D]

Models load as mm.zeroshot loads them (ZeroShotClassifier.from_checkpoint / from_pretrained): checkpoints
are read with weights_only=True, and an open_clip model never downloads, its weights must be a local file.
Images go through the model's own eval transform (resize, centre crop, its mean/std).

Anything with the two methods `embed_images(list[PIL.Image]) -> [N, D]` and `embed_texts(list[str]) -> [N, D]`
can stand in for a ClipEmbedder (the curation steps take one as a parameter; tests pass crafted ones).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

OPEN_CLIP_PREFIX = "open_clip:"


class Embedder(Protocol):
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class ClipEmbedder:
    """A CLIP model with its eval transform and tokenizer, embedding `batch_size` items per forward."""

    def __init__(self, model, preprocess, tokenizer, device, batch_size: int = 64, name: str = "clip"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.batch_size, self.name = device, batch_size, name
        self._dim: int | None = None

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[N] decoded images -> [N, D] float32 unit vectors."""
        import torch

        from mm.clip.evaluate import encode_images

        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + self.batch_size]])
            out.append(encode_images(self.model, pixels.to(self.device)).cpu().numpy())
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N] strings -> [N, D] float32 unit vectors (the tokenizer truncates to the model's context)."""
        from mm.clip.evaluate import encode_texts

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return encode_texts(self.model, self.tokenizer, list(texts), self.device, self.batch_size).cpu().numpy()

    @property
    def dim(self) -> int:
        """D, the shared embedding width (from one tiny text forward, once: towers name it differently)."""
        if self._dim is None:
            from mm.clip.evaluate import encode_texts
            self._dim = int(encode_texts(self.model, self.tokenizer, [""], self.device).shape[1])
        return self._dim


def resolve_device(device: str):
    """"auto": the first GPU when there is one, else the CPU; otherwise the named torch device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_clip_embedder(checkpoint: str, pretrained: str | None = None, device: str = "auto",
                       batch_size: int = 64) -> ClipEmbedder:
    """A ClipEmbedder for `checkpoint`: a run folder, export folder or step_* checkpoint of
    recipes/clip/train.py, or `open_clip:NAME` (an open_clip architecture, one of mm/clip/model_configs,
    or a .json config) with `pretrained` a local weights file (.pt/.bin/.safetensors).

    Raises FileNotFoundError for a missing checkpoint or weights file, ValueError for a bad combination
    and CheckpointError (a ValueError) for a file that is not a CLIP checkpoint.
    """
    clf = load_classifier(checkpoint, pretrained, str(resolve_device(device)))
    return ClipEmbedder(clf.model, clf.preprocess, clf.tokenizer, clf.device, batch_size, name=clf.name)


def check_checkpoint(checkpoint: str, pretrained: str | None) -> None:
    """Fail early, before any data is read, for a checkpoint that cannot load: FileNotFoundError for a missing
    path or weights file, ValueError for pretrained without open_clip:NAME or open_clip:NAME without it."""
    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        if not pretrained:
            # open_clip would start from random weights (or download a tag): neither scores anything
            raise ValueError(f"checkpoint={checkpoint} needs pretrained=/path/to/weights (a local file; "
                             f"nothing is downloaded)")
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained={pretrained}: no such weights file (nothing is downloaded)")
    elif pretrained:
        raise ValueError(f"pretrained={pretrained} only goes with checkpoint=open_clip:NAME; "
                         f"{checkpoint} carries its own weights")
    elif not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no such run folder, export or checkpoint file. "
                                f"Train one with: python recipes/clip/train.py --out_dir={checkpoint}")


@functools.lru_cache(maxsize=2)
def load_classifier(checkpoint: str, pretrained: str | None, device: str):
    """The model loaded once per (checkpoint, weights, device) in a process: a pipeline with both clip_score
    and semdedup on one checkpoint reads and builds it once."""
    from mm.zeroshot import ZeroShotClassifier

    check_checkpoint(checkpoint, pretrained)
    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        return ZeroShotClassifier.from_pretrained(checkpoint[len(OPEN_CLIP_PREFIX):], pretrained, device=device)
    return ZeroShotClassifier.from_checkpoint(checkpoint, device=device)


def embed_samples(samples: Iterable[dict], embedder: Embedder, report, batch_size: int = 64,
                  with_text: bool = False) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
    """Raw samples -> (sample, image embedding [D], caption embedding [D] or None), in input order, embedded
    `batch_size` at a time. Each sample in is `seen` in `report`; one without an image is dropped as `no_image`,
    one whose image (or text) does not decode as `corrupt`, and with `with_text` one without a caption as
    `no_caption` (it is not an image-text pair)."""
    from data_tools.curate.io import decode_image, sample_image_bytes, sample_text

    batch: list[tuple[dict, Image.Image, str | None]] = []
    for sample in samples:
        report.seen()
        if sample_image_bytes(sample) is None:
            report.drop(sample, "no_image", "no image field to embed")
            continue
        try:
            image = decode_image(sample)
            text = sample_text(sample) if with_text else None
        except Exception as e:  # noqa: BLE001 - any undecodable sample is counted, never fatal
            report.corrupt(sample.get("__key__") or sample.get("__url__") or "?", e)
            continue
        if with_text and not (text and text.strip()):
            report.drop(sample, "no_caption", "no txt/caption field or json text to score the image against")
            continue
        batch.append((sample, image, text))
        if len(batch) >= batch_size:
            yield from _embed_batch(batch, embedder, with_text)
            batch = []
    if batch:
        yield from _embed_batch(batch, embedder, with_text)


def _embed_batch(batch, embedder: Embedder, with_text: bool):
    image_emb = embedder.embed_images([image for _, image, _ in batch])
    text_emb = embedder.embed_texts([text for _, _, text in batch]) if with_text else [None] * len(batch)
    for (sample, _, _), i, t in zip(batch, image_emb, text_emb):
        yield sample, i, t
