"""Zero-shot classification and image<->text retrieval for CLIP models.

`build_zero_shot_head` turns class names x prompt templates into one unit vector per class
(mean of the template embeddings, as in Radford et al. 2021); classification is then a matmul.
`evaluate_clip` is sharded across ranks when run distributed (every rank must call it): each encodes
its share of the images, counts are summed and retrieval features gathered, so a long evaluation
never leaves the other ranks waiting at a collective until it times out. (For a model replicated on
every rank, as under DDP; an FSDP-sharded one would also need equal batch counts on every rank, since
each of its forwards is a collective.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from mm.clip.data import collate_labels, collate_texts
from mm.decoders import labelled_decoder, pair_decoder
from mm.distributed import all_gather_objects, all_reduce_sum, world
from mm.shards import iterate_eval_batches


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """[N] strings -> [N, D] unit vectors."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] preprocessed -> [B, D] unit vectors."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


@torch.no_grad()
def build_zero_shot_head(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompt embeddings ("a photo of a {}." x class)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, device).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def zero_shot_accuracy(model, head: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device
                       ) -> dict[str, float]:
    """Top-1/top-5 accuracy of `head` ([C, D]) on (images [B,3,H,W], labels [B]) batches (summed over ranks)."""
    counts = {"n": 0, "top1": 0, "top5": 0}
    for images, labels in batches:
        feats = encode_images(model, images.to(device))
        hits = topk_correct(feats @ head.T, labels.to(device))
        counts = {"n": counts["n"] + len(labels), "top1": counts["top1"] + hits[1], "top5": counts["top5"] + hits[5]}
    counts = all_reduce_sum(counts, device)
    if counts["n"] == 0:
        raise ValueError("zero-shot evaluation set is empty")
    return {"zeroshot_top1": counts["top1"] / counts["n"], "zeroshot_top5": counts["top5"] / counts["n"],
            "zeroshot_n": int(counts["n"])}


@torch.no_grad()
def retrieval_recall(model, tokenizer, batches: Iterable[tuple[torch.Tensor, list[str]]], device,
                     ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k on held-out (images, captions) pairs; pair i matches i.

    Several images can share a caption text; a retrieval counts as correct if it finds the paired item.
    Distributed: every rank's pairs are gathered, so each retrieves among all of them.
    """
    img, txt = [torch.empty(0)], [torch.empty(0)]
    for images, captions in batches:
        img.append(encode_images(model, images.to(device)).cpu())
        txt.append(encode_texts(model, tokenizer, list(captions), device).cpu())
    parts = all_gather_objects((torch.cat(img[1:]) if len(img) > 1 else None, torch.cat(txt[1:]) if len(txt) > 1 else None))
    img = torch.cat([i for i, _ in parts if i is not None])
    txt = torch.cat([t for _, t in parts if t is not None])
    labels = torch.arange(len(img))
    sims = img @ txt.T
    i2t, t2i = topk_correct(sims, labels, ks), topk_correct(sims.T, labels, ks)
    out = {f"retrieval_i2t_r@{k}": i2t[k] / len(img) for k in ks}
    out.update({f"retrieval_t2i_r@{k}": t2i[k] / len(img) for k in ks})
    return out


def evaluate_clip(model, preprocess, tokenizer, device, zeroshot_data: str | None = None,
                  val_data: str | None = None, recall_ks=(1, 5), batch_size: int = 256) -> dict[str, float]:
    """Zero-shot top-1/top-5 on `zeroshot_data` (labelled shards + classnames.json + templates.json beside
    them) and retrieval recall@k on `val_data` (image-caption shards); either may be None to skip it.
    Every rank calls it; each evaluates its share."""
    rank, world_size = world()
    out = {}
    if zeroshot_data:
        zs = Path(zeroshot_data)
        head = build_zero_shot_head(model, tokenizer, json.loads((zs / "classnames.json").read_text()),
                                    json.loads((zs / "templates.json").read_text()), device)
        batches = iterate_eval_batches(zeroshot_data, labelled_decoder(preprocess), collate_labels, batch_size,
                                       rank, world_size)
        out.update(zero_shot_accuracy(model, head, batches, device))
    if val_data:
        batches = iterate_eval_batches(val_data, pair_decoder(preprocess), collate_texts, batch_size, rank, world_size)
        out.update(retrieval_recall(model, tokenizer, batches, device, ks=recall_ks))
    return out
