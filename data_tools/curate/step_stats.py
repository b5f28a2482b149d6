"""Step statistics in report.json: what a step measured besides its counts (CLIP-score percentiles, the
clusters SemDeDup made, the samples each balancing entry admitted), and a flat-memory summary of similarities."""
from __future__ import annotations

import math

import numpy as np

PERCENTILES = (1, 5, 10, 25, 30, 50, 70, 75, 90, 95, 99)


class ScoreStats:
    """Cosine similarities (CLIP scores, nearest-kept similarities): count, mean, min, max and percentiles, in
    flat memory: a histogram of 0.001-wide bins over the cosine's range [-1, 1], so percentiles are exact to
    +-0.0005."""

    BINS = 2000

    def __init__(self):
        self.counts = np.zeros(self.BINS, np.int64)
        self.n, self.total, self.lo, self.hi = 0, 0.0, math.inf, -math.inf

    def add(self, score: float) -> None:
        b = min(max(int((score + 1.0) / 2.0 * self.BINS), 0), self.BINS - 1)
        self.counts[b] += 1
        self.n += 1
        self.total += score
        self.lo, self.hi = min(self.lo, score), max(self.hi, score)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of the scores added, to the bin centre."""
        rank = max(1, math.ceil(q / 100 * self.n))
        b = int(np.searchsorted(np.cumsum(self.counts), rank))
        return round(-1.0 + (b + 0.5) * 2.0 / self.BINS, 4)

    def add_many(self, scores: np.ndarray) -> None:
        for score in np.asarray(scores, np.float64).ravel().tolist():
            self.add(score)

    def summary(self) -> dict:
        """{"n", "mean", "min", "max", "percentiles": {"p1", "p5", ..., "p99"}} ({"n": 0} when empty)."""
        if not self.n:
            return {"n": 0}
        return {"n": self.n, "mean": round(self.total / self.n, 4), "min": round(self.lo, 4), "max": round(self.hi, 4),
                "percentiles": {f"p{q}": self.percentile(q) for q in PERCENTILES}}
