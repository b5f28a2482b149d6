"""CLIP-score filtering (DataComp's rule): score each image-caption pair by the cosine similarity of its
normalised CLIP image and text embeddings, then keep those scoring at least `threshold`, or the best
`top_percent`% of the input.

    python -m data_tools.curate.clip_score raw/ --output=scored/ --checkpoint=runs/clip --top_percent=30
    python -m data_tools.curate.clip_score raw/ --output=scored/ --checkpoint=open_clip:ViT-B-32 \
        --pretrained=/weights/vit_b32_openai.pt --threshold=0.25

Picking a threshold: DataComp's 0.25 is for OpenAI's ViT-B/32 (its "CLIP score (L/14 30%)" baseline keeps the
top 30% instead). Other models, and our small ones above all, score on their own scale, so 0.25 can keep all
or nothing. Run once with `--threshold=-1` (keeps everything) and read stats.score.percentiles in report.json:
to keep the best 30%, take score.percentiles.p70 as the threshold, or simply use `--top_percent=30`.

top_percent keeps exactly ceil(n * top_percent / 100) of the n scored samples (ties at the cut go to the
earlier ones). It needs the whole input before it can decide: pass 1 spills the samples to a temp tar and
their scores to a flat float32 file (4 bytes a sample; the cut is found with np.partition on a copy of it),
pass 2 streams the spilled samples back out. Threshold mode streams in one pass.

Reason codes: `low_clip_score` (detail: the score and the bar), `corrupt` (undecodable image or text),
`no_image`, `no_caption`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from data_tools.curate.embed import Embedder, check_checkpoint, embed_samples, load_clip_embedder
from data_tools.curate.report import Report
from data_tools.curate.spill import Spill
from data_tools.curate.step_stats import ScoreStats

LOW_SCORE = "low_clip_score"
DATACOMP_VIT_B32_THRESHOLD = 0.25  # DataComp (Gadre et al. 2023), OpenAI ViT-B/32 scores


@dataclass
class ClipScoreConfig:
    checkpoint: str = "runs/clip"  # CLIP run folder, export or step_*.pt of recipes/clip, or open_clip:NAME
    pretrained: str | None = None  # local weights file for checkpoint=open_clip:NAME (nothing is downloaded)
    threshold: float | None = None  # keep pairs scoring >= this (DataComp ViT-B/32: 0.25; see report percentiles)
    top_percent: float | None = None  # or keep the best this % of the input (two passes, spilled to tmp_dir)
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 64  # images and captions per forward pass
    tmp_dir: str = ""  # where top_percent spills (empty: a temp folder inside the output folder, or the system's)


def check_config(cfg: ClipScoreConfig, need_model: bool = True) -> None:
    """ValueError for settings that cannot work, FileNotFoundError for a checkpoint that is not there (with
    need_model): before any data is read."""
    if (cfg.threshold is None) == (cfg.top_percent is None):
        raise ValueError("clip_score needs exactly one of threshold (e.g. 0.25 for OpenAI ViT-B/32) or top_percent "
                         "(e.g. 30); to see your model's score scale first, run with threshold=-1 and read the "
                         "score percentiles in report.json")
    if cfg.top_percent is not None and not 0 < cfg.top_percent <= 100:
        raise ValueError(f"top_percent must be in (0, 100], got {cfg.top_percent}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if need_model:
        check_checkpoint(cfg.checkpoint, cfg.pretrained)


def apply(samples: Iterable[dict], cfg: ClipScoreConfig, report: Report,
          embedder: Embedder | None = None) -> Iterator[dict]:
    """Keep the pairs that pass the CLIP-score bar. `embedder` (default: loaded from cfg.checkpoint) is
    anything with embed_images / embed_texts returning unit rows (see data_tools.curate.embed)."""
    check_config(cfg, need_model=embedder is None)
    if embedder is None:
        embedder = load_clip_embedder(cfg.checkpoint, cfg.pretrained, cfg.device, cfg.batch_size)
    scored = ((s, float(np.dot(i, t))) for s, i, t in embed_samples(samples, embedder, report, cfg.batch_size,
                                                                     with_text=True))
    stats = ScoreStats()
    if cfg.threshold is not None:
        yield from keep_above(scored, cfg.threshold, report, stats)
    else:
        yield from keep_top_percent(scored, cfg.top_percent, report, stats, cfg.tmp_dir or None)
    report.stats.update({"score": stats.summary()})


def keep_above(scored: Iterable[tuple[dict, float]], threshold: float, report: Report,
               stats: ScoreStats) -> Iterator[dict]:
    for sample, score in scored:
        stats.add(score)
        if score >= threshold:
            report.keep(sample)
            yield sample
        else:
            report.drop(sample, LOW_SCORE, f"score {score:.4f} < threshold {threshold:g}")


def keep_top_percent(scored: Iterable[tuple[dict, float]], top_percent: float, report: Report,
                     stats: ScoreStats, tmp_dir: str | None) -> Iterator[dict]:
    with Spill(tmp_dir, dim=1, prefix="clip-score-") as spill:
        for sample, score in scored:  # pass 1
            stats.add(score)
            spill.add(sample, score)
        scores = spill.rows()[:, 0]
        n_keep = top_count(spill.n, top_percent)
        cut, ties_left = find_cut(scores, n_keep)
        for i, sample in enumerate(spill.samples()):  # pass 2
            score = float(scores[i])
            at_cut = score == cut and ties_left > 0
            if score > cut or at_cut:
                ties_left -= int(at_cut)
                report.keep(sample)
                yield sample
            else:
                report.drop(sample, LOW_SCORE, f"score {score:.4f} below the top {top_percent:g}% (cut {cut:.4f})")


def top_count(n: int, top_percent: float) -> int:
    """How many of n samples the top `top_percent`% keeps: ceil(n * top_percent / 100)."""
    return math.ceil(round(n * top_percent / 100, 9))  # round: 0.29 * 100 must not become 29.000000000000004


def find_cut(scores: np.ndarray, n_keep: int) -> tuple[float, int]:
    """(the n_keep-th highest score, how many samples scoring exactly that are kept) so that exactly n_keep
    samples are kept: those above the cut, and the first `ties` of those at it."""
    n = len(scores)
    if n_keep <= 0 or n == 0:
        return math.inf, 0
    values = np.array(scores, dtype=np.float32)  # 4 bytes a sample: the one thing held for the whole input
    cut = float(np.partition(values, n - n_keep)[n - n_keep])
    above = int(np.count_nonzero(values > cut))
    return cut, n_keep - above


def main(argv: list[str] | None = None) -> int:
    from data_tools.curate.cli import run_tool
    return run_tool("clip_score", apply, ClipScoreConfig, argv, check=check_config)


if __name__ == "__main__":
    sys.exit(main())
