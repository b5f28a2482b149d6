"""What one curation step did: samples in, samples out, and each drop counted under a reason code.

    report = Report("dedup")
    for sample in samples:
        report.seen()
        if is_duplicate(sample):
            report.drop(sample, "exact_image", detail="same bytes as 000042")
        else:
            report.keep(sample)

The counts always add up: n_in == n_out + sum(drops.values()). Up to `MAX_EXAMPLES` examples are kept
per reason (key, url, detail), so report.json says not just how many were dropped but which, and why.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

MAX_EXAMPLES = 5  # examples kept per reason code
CORRUPT = "corrupt"  # the reason code of a sample (or shard) that cannot be read or decoded


class Report:
    """Counts of one step. `seen` every sample that comes in, then exactly one of `keep`, `drop`, `corrupt`."""

    def __init__(self, step: str, on_drop: Callable[[dict], None] | None = None):
        self.step = step
        # called with every drop in full, {"step", "key", "url", "reason", "detail"}, for a caller that needs all of
        # them (report.json keeps MAX_EXAMPLES a reason): benchmarks/curation_gain.py scores each drop
        self.on_drop = on_drop
        self._n_in = 0
        self._n_out = 0
        self._drops: Counter[str] = Counter()
        self._examples: dict[str, list[dict]] = {}
        self.stats: dict = {}  # what a step measured besides counts (score percentiles, ...): JSON values

    def seen(self, n: int = 1) -> None:
        self._n_in += n

    def keep(self, sample: dict | None = None) -> None:
        self._n_out += 1

    def drop(self, sample: dict, reason: str, detail: str = "") -> None:
        self._record(reason, sample.get("__key__"), sample.get("__url__"), detail)

    def corrupt(self, key_or_url: str, error: Exception | str) -> None:
        """A sample or shard that could not be read or decoded: dropped under reason `corrupt`."""
        detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        self._record(CORRUPT, key_or_url, None, detail)

    def _record(self, reason: str, key, url, detail: str) -> None:
        if not reason or not isinstance(reason, str):
            raise ValueError(f"a drop needs a reason code (a non-empty string), got {reason!r}")
        self._drops[reason] += 1
        if self.on_drop is not None:
            self.on_drop({"step": self.step, "key": key, "url": url, "reason": reason, "detail": detail})
        examples = self._examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"key": key, "url": url, "detail": detail[:500]})

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

    @property
    def drops(self) -> dict[str, int]:
        return dict(self._drops)

    @property
    def n_dropped(self) -> int:
        return sum(self._drops.values())

    def check(self) -> None:
        """Raise AssertionError when the counts do not add up: a step forgot to keep or drop a sample."""
        if self.n_in != self.n_out + self.n_dropped:
            raise AssertionError(f"step {self.step}: {self.n_in} in != {self.n_out} out + {self.n_dropped} dropped")

    def to_dict(self) -> dict:
        out = {"step": self.step, "n_in": self.n_in, "n_out": self.n_out, "drops": dict(sorted(self._drops.items())),
               "examples": {k: list(v) for k, v in sorted(self._examples.items())}}
        return {**out, "stats": self.stats} if self.stats else out

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        report = cls(d["step"])
        report._n_in, report._n_out = int(d["n_in"]), int(d["n_out"])
        report._drops = Counter({k: int(v) for k, v in d.get("drops", {}).items()})
        report._examples = {k: list(v) for k, v in d.get("examples", {}).items()}
        report.stats = dict(d.get("stats", {}))
        return report

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON to a temp file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def format_funnel(reports: list[Report]) -> str:
    """A table: one row per step, with samples in, out, and dropped by reason."""
    rows = [("step", "in", "out", "dropped (by reason)")]
    for r in reports:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r.drops.items(), key=lambda kv: -kv[1])) or "-"
        rows.append((r.step, str(r.n_in), str(r.n_out), why))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)
