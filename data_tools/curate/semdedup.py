"""SemDeDup (Abbas et al. 2023): drop images that are semantic near-duplicates of another, by CLIP embedding.

    python -m data_tools.curate.semdedup raw/ --output=semdedup/ --checkpoint=runs/clip --eps=0.05

1. Embed every image with a CLIP checkpoint (ours, or open_clip:NAME with --pretrained weights on disk).
2. Cluster the unit embeddings with k-means (scikit-learn's MiniBatchKMeans, seeded, fed from disk in chunks).
3. Within each cluster, walk its items in order and drop an item whose cosine similarity to an item already
   KEPT exceeds 1 - eps; otherwise keep it. So each group of duplicates keeps exactly one member. The reference
   code (facebookresearch/SemDeDup) compares each item with every earlier one, dropped ones included, which
   drops more than one should (a chain A~B~C loses C for resembling the dropped B; SemDeDup issue #8).

Order within a cluster (`keep`): "farthest" (default) walks items from the least similar to the cluster centroid,
so the kept member of a group is its least prototypical one, as the reference code does by default (keep_hard,
"hard" examples); "closest" keeps the most prototypical one; "first" keeps the earliest in input order.

Memory: embeddings go to a flat float32 file on disk (4*D bytes a sample) and the samples to a temp tar; the
cluster walk reads embeddings in blocks of `block_size` rows, so RAM does not follow the largest cluster
(the index arrays cost ~20 bytes a sample). Pass 2 streams the spilled samples out, in input order.

Duplicates that k-means puts in different clusters are not found (as in the paper): more clusters is faster
(the walk is quadratic per cluster) but misses more. Clusters are capped at one per `min_cluster_size` samples.

Picking eps: models differ in how tightly they pack images (a tiny model trained on synthetic shapes puts
most pairs above 0.99). report.json lists `nearest_kept_similarity` percentiles: each image's highest
similarity to an image kept before it in its cluster; a duplicate group shows as a mass near 1.

Reason codes: `semantic_duplicate` (detail: the key of the kept sample it duplicates and their similarity),
`corrupt` (undecodable image), `no_image`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np

from data_tools.curate.embed import Embedder, check_checkpoint, embed_samples, load_clip_embedder
from data_tools.curate.report import Report
from data_tools.curate.spill import Spill
from data_tools.curate.step_stats import ScoreStats

DUPLICATE = "semantic_duplicate"


@dataclass
class SemDedupConfig:
    checkpoint: str = "runs/clip"  # CLIP run folder, export or step_*.pt of recipes/clip, or open_clip:NAME
    pretrained: str | None = None  # local weights file for checkpoint=open_clip:NAME (nothing is downloaded)
    eps: float = 0.05  # drop an image whose cosine similarity to a kept image of its cluster is > 1 - eps
    n_clusters: int = 100  # k-means clusters (the paper: 50k for LAION-440M), capped by min_cluster_size
    min_cluster_size: int = 10  # at most one cluster per this many samples (small inputs get fewer clusters)
    keep: Literal["farthest", "closest", "first"] = "farthest"  # which member of a group to keep (see module doc)
    seed: int = 0  # k-means initialisation and chunk order
    kmeans_epochs: int = 3  # passes of MiniBatchKMeans over the embeddings
    block_size: int = 1024  # embeddings compared at a time, and k-means chunk rows (at least 3 per cluster)
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 64  # images per forward pass
    tmp_dir: str = ""  # where the embeddings and samples spill (empty: inside the output folder, or the system's)


def check_config(cfg: SemDedupConfig, need_model: bool = True) -> None:
    """ValueError for settings that cannot work, FileNotFoundError for a checkpoint that is not there (with
    need_model): before any data is read."""
    if not 0 < cfg.eps < 2:
        raise ValueError(f"eps must be in (0, 2) (similarity above 1 - eps is a duplicate), got {cfg.eps}")
    for key in ("n_clusters", "min_cluster_size", "kmeans_epochs", "block_size", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if need_model:
        check_checkpoint(cfg.checkpoint, cfg.pretrained)


def apply(samples: Iterable[dict], cfg: SemDedupConfig, report: Report,
          embedder: Embedder | None = None) -> Iterator[dict]:
    """Keep one image of each group of semantic duplicates. `embedder` (default: loaded from cfg.checkpoint)
    is anything with embed_images returning unit rows (see data_tools.curate.embed)."""
    check_config(cfg, need_model=embedder is None)
    if embedder is None:
        embedder = load_clip_embedder(cfg.checkpoint, cfg.pretrained, cfg.device, cfg.batch_size)
    embedded = embed_samples(samples, embedder, report, cfg.batch_size)
    first = next(embedded, None)
    if first is None:
        report.stats.update({"n_embedded": 0})
        return
    with Spill(cfg.tmp_dir or None, dim=len(first[1]), prefix="semdedup-") as spill:
        spill.add(first[0], first[1])
        for sample, image_emb, _ in embedded:  # pass 1
            spill.add(sample, image_emb)
        emb = spill.rows()
        labels, sims, k = cluster(emb, cfg)
        dup_of, nearest = find_duplicates(emb, labels, order_key(sims, cfg.keep), 1 - cfg.eps, cfg.block_size)
        for i, sample in enumerate(spill.samples()):  # pass 2
            if dup_of[i] < 0:
                report.keep(sample)
                yield sample
            else:
                report.drop(sample, DUPLICATE, f"of {spill.key(int(dup_of[i]))} (cosine {nearest[i]:.4f})")
        sizes = np.bincount(labels, minlength=k)
        nearest_stats = ScoreStats()
        nearest_stats.add_many(nearest[np.isfinite(nearest)])
        report.stats.update({"n_embedded": spill.n, "n_clusters": k, "largest_cluster": int(sizes.max()),
                              "similarity_threshold": round(1 - cfg.eps, 6), "keep": cfg.keep,
                              "nearest_kept_similarity": nearest_stats.summary()})


def n_clusters_for(n: int, cfg: SemDedupConfig) -> int:
    return max(1, min(cfg.n_clusters, n // cfg.min_cluster_size))


def cluster(emb: np.ndarray, cfg: SemDedupConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """([N] cluster of each row, [N] cosine similarity of each row to its cluster's centroid, k), with k-means fed
    `block_size` rows at a time from the [N, D] embeddings on disk (a RowFile; an array works too)."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(emb)
    k = n_clusters_for(n, cfg)
    # k-means chunks: partial_fit needs at least k rows in its first one, and ~3 rows per centroid per chunk
    # keep a tight group of duplicates from being split between centroids (seen with chunks of k rows)
    chunks = row_chunks(n, max(cfg.block_size, 3 * k))
    if k > 1:
        km = MiniBatchKMeans(n_clusters=k, random_state=cfg.seed, n_init=1)
        rng = np.random.default_rng(cfg.seed)
        for _ in range(cfg.kmeans_epochs):
            for c in rng.permutation(len(chunks)):
                km.partial_fit(np.asarray(emb[slice(*chunks[c])]))
        centroids = km.cluster_centers_
    else:  # one cluster: its centroid is the mean direction
        centroids = sum(np.asarray(emb[slice(*c)], np.float64).sum(axis=0) for c in chunks)[None]
    centroids = (centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    labels, sims = np.empty(n, np.int64), np.empty(n, np.float32)
    for start, end in chunks:
        scores = np.asarray(emb[start:end]) @ centroids.T  # cosine: rows and centroids are unit vectors
        labels[start:end] = scores.argmax(axis=1)
        sims[start:end] = scores.max(axis=1)
    return labels, sims, k


def row_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of `size` rows covering [0, n); a shorter tail joins the chunk before it."""
    chunks = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < size:
        chunks[-2:] = [(chunks[-2][0], n)]
    return chunks


def order_key(sims: np.ndarray, keep: str) -> np.ndarray:
    """A key that sorts each cluster's items in walking order (ties: input order)."""
    if keep == "farthest":
        return sims
    if keep == "closest":
        return -sims
    return np.zeros_like(sims)


def find_duplicates(emb: np.ndarray, labels: np.ndarray, key: np.ndarray, threshold: float,
                    block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([N] index of the kept row each row duplicates, -1 for kept rows; [N] each row's highest cosine
    similarity to a row of its cluster kept before it, -inf for the first of a cluster).

    Each cluster's rows are walked in `key` order; a row whose cosine similarity to a row kept before it
    exceeds `threshold` is a duplicate of the most similar one, otherwise it is kept."""
    n = len(emb)
    order = np.lexsort((np.arange(n), key, labels))  # by cluster, then key, then input order
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    dup_of, nearest = np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    for members in np.split(order, bounds):
        walk_cluster(emb, members, threshold, block_size, dup_of, nearest)
    return dup_of, nearest


def walk_cluster(emb: np.ndarray, members: np.ndarray, threshold: float, block_size: int,
                 dup_of: np.ndarray, nearest: np.ndarray) -> None:
    """Greedy dedup of one cluster's rows (`members`, in walking order) against the rows kept so far, a block
    of `block_size` rows at a time: each block is compared with the kept rows block by block, then with itself."""
    kept: list[int] = []
    for start in range(0, len(members), block_size):
        idx = members[start:start + block_size]
        x = np.asarray(emb[idx], dtype=np.float32)  # [b, D]
        best_sim, best_j = np.full(len(idx), -np.inf, np.float32), np.full(len(idx), -1, np.int64)
        for ks in range(0, len(kept), block_size):
            kept_idx = np.asarray(kept[ks:ks + block_size])
            s = x @ np.asarray(emb[kept_idx], dtype=np.float32).T  # [b, kb]
            j = s.argmax(axis=1)
            better = s[np.arange(len(idx)), j] > best_sim
            best_sim[better], best_j[better] = s[np.arange(len(idx)), j][better], kept_idx[j][better]
        within = x @ x.T  # [b, b]
        for r in range(len(idx)):
            nearest[idx[r]] = best_sim[r]
            if best_sim[r] > threshold:
                dup_of[idx[r]] = best_j[r]
                continue
            kept.append(int(idx[r]))
            later = within[r + 1:, r]  # the later rows of this block now also compare with row r
            closer = later > best_sim[r + 1:]
            best_sim[r + 1:][closer], best_j[r + 1:][closer] = later[closer], idx[r]


def main(argv: list[str] | None = None) -> int:
    from data_tools.curate.cli import run_tool
    return run_tool("semdedup", apply, SemDedupConfig, argv, check=check_config)


if __name__ == "__main__":
    sys.exit(main())
