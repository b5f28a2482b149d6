"""Reshard: rewrite shards to a target size (`max_count` samples each) or count (`n_shards`), with a global shuffle
across all input shards, in flat memory.

    python -m data_tools.curate.reshard raw/ --output=resharded/ --n_shards=64 --seed=0

Pass 1 reads the input into runs of at most `memory_mb` of sample bytes, shuffles each run in memory and spills
it to a temp tar. Pass 2 merges the runs, drawing the next sample from each run with probability proportional to
what it has left: every interleaving is then equally likely, so shuffled runs merge into a uniform shuffle of the
whole input. At most `max_open` runs are read at once; past that, runs are merged in rounds into bigger runs
first, so open files stay bounded. The same input and seed give the same shards, byte for byte. Data that fits in
one run never touches the disk.

Every sample is kept (the report shows samples in = out). With `n_shards`, samples are spread evenly (shard sizes
differ by at most one) and the output's shard_max_mb is not applied.

Sources numbered alike (two datasets both keyed 000000...) share keys, and a shuffle puts equal keys side by side
now and then; a reader groups neighbouring tar members by key, so the two would read back as one broken sample
(webdataset fails on the repeated field, losing the rest of the shard). `separate_equal_keys` moves such a sample
a few places on, in every tar written here: runs, merged runs and the output.
"""
from __future__ import annotations

import logging
import random
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds

from mm.config import ConfigError
from mm.shards import COUNTS, read_samples

from data_tools.curate.io import TAR_MTIME, ShardWriter, sample_nbytes
from data_tools.curate.report import Report

log = logging.getLogger(__name__)
KEY_DELAY = 16  # samples held back by separate_equal_keys, so that a repeat at the very end still finds a gap


@dataclass
class ReshardConfig:
    max_count: int | None = None  # samples per output shard (or set n_shards; neither: the output's shard_max_count)
    n_shards: int | None = None  # how many output shards, samples spread evenly (or set max_count)
    shuffle: bool = True  # shuffle globally, across all input shards (false: keep the input order)
    seed: int = 0  # the shuffle's seed: the same input and seed give the same shards
    memory_mb: float = 256.0  # sample bytes held in memory at once while shuffling, in 10^6 bytes (one run)
    max_open: int = 64  # runs read at once while merging; more are merged in rounds first
    tmp_dir: str = ""  # folder for the spilled runs (empty: a temp folder inside the output folder)


def check_config(cfg: ReshardConfig) -> None:
    if cfg.max_count is not None and cfg.n_shards is not None:
        raise ConfigError("set --max_count (samples per shard) or --n_shards (how many shards), not both")
    for name in ("max_count", "n_shards"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    if cfg.memory_mb <= 0:
        raise ConfigError(f"--memory_mb={cfg.memory_mb}: must be positive")
    if cfg.max_open < 2:
        raise ConfigError(f"--max_open={cfg.max_open}: a merge needs at least 2 runs open")


@dataclass
class Run:
    path: Path
    count: int


def separate_equal_keys(samples: Iterable[dict], delay: int = KEY_DELAY) -> Iterator[dict]:
    """The samples, each once, with no two neighbours sharing a `__key__`: a sample whose key equals its
    neighbour's goes into the nearest gap among the last `delay` samples held back, or waits for one."""
    window: deque[dict] = deque()  # the latest samples, not yet yielded
    waiting: list[dict] = []  # samples no gap was found for yet (at most `delay`)
    before = None  # the key of the last sample yielded
    forced = []  # keys of samples placed next to their twin: no gap was to be had
    for sample in samples:
        for s in [sample, *waiting]:
            placed = _place(window, before, s)
            if s is sample and not placed:
                waiting.append(s)
            elif s is not sample and placed:
                waiting.remove(s)
        if len(waiting) > delay:  # one key floods the stream: memory and rescans stay bounded by `delay`
            forced.append(waiting[0]["__key__"])
            window.append(waiting.pop(0))
        while len(window) > delay:
            out = window.popleft()
            before = out["__key__"]
            yield out
    for s in waiting:
        if not _place(window, before, s):  # no gap anywhere: one key fills the stream's tail
            forced.append(s["__key__"])
            window.append(s)
    if forced:
        log.warning("%d sample(s) follow one with the same key (e.g. %r): readers will merge each pair",
                    len(forced), forced[0])
    yield from window


def _place(window: deque, before, sample: dict) -> bool:
    """Put `sample` at the end of `window` or, failing that, in the last gap whose neighbours' keys differ from
    its own; False when there is none."""
    key = sample["__key__"]
    for i in range(len(window), -1, -1):
        left = window[i - 1]["__key__"] if i else before
        right = window[i]["__key__"] if i < len(window) else None
        if left != key and right != key:
            window.insert(i, sample)
            return True
    return False


def write_tar(samples: Iterable[dict], path: Path) -> int:
    """Write samples (neighbours' keys kept apart) to a temp tar; returns how many."""
    n = 0
    with wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME) as tar:
        for s in separate_equal_keys(samples):
            tar.write(s)
            tar.tarstream.members = []  # tarfile keeps every TarInfo otherwise
            n += 1
    return n


def write_run(samples: list[dict], path: Path) -> Run:
    return Run(path, write_tar(samples, path))


def read_run(run: Run) -> Iterator[dict]:
    """A spilled run's samples; RuntimeError if it cannot be read back whole (a disk fault, not the input's)."""
    counts = dict.fromkeys(COUNTS, 0)
    n = 0
    for sample in read_samples([str(run.path)], counts):
        n += 1
        yield sample
    if counts["bad_shards"] or n != run.count:
        raise RuntimeError(f"temp run {run.path} gave back {n} of {run.count} samples")


def spill_runs(samples: Iterable[dict], cfg: ReshardConfig, report: Report, folder: Path,
               rng: random.Random) -> tuple[list[Run], list[dict] | None]:
    """Pass 1: (runs on disk, None), or ([], the shuffled samples) when they all fit in one run's memory."""
    runs: list[Run] = []
    buf: list[dict] = []
    nbytes = 0
    for sample in samples:
        report.seen()
        report.keep(sample)
        buf.append(sample)
        nbytes += sample_nbytes(sample)
        if nbytes >= cfg.memory_mb * 1e6:
            if cfg.shuffle:
                rng.shuffle(buf)
            runs.append(write_run(buf, folder / f"run-{len(runs):06d}.tar"))
            buf, nbytes = [], 0
    if cfg.shuffle:
        rng.shuffle(buf)
    if not runs:
        return [], buf
    if buf:
        runs.append(write_run(buf, folder / f"run-{len(runs):06d}.tar"))
    return runs, None


def interleave(runs: list[Run], rng: random.Random, shuffle: bool) -> Iterator[dict]:
    """Merge runs: each next sample from a run drawn with probability proportional to what it has left (or, not
    shuffling, the runs one after another)."""
    readers = [read_run(r) for r in runs]
    left = [r.count for r in runs]
    total = sum(left)
    i = 0
    while total:
        if shuffle:
            pick = rng.randrange(total)
            i = 0
            while pick >= left[i]:
                pick -= left[i]
                i += 1
        else:
            while not left[i]:
                i += 1
        yield next(readers[i])
        left[i] -= 1
        total -= 1
    for reader in readers:  # let each check that its run ended where it should
        for _ in reader:
            raise RuntimeError("a temp run holds more samples than were written to it")


def merge_runs(runs: list[Run], cfg: ReshardConfig, rng: random.Random, folder: Path) -> Iterator[dict]:
    """Pass 2: merge in rounds of at most max_open runs, until one last merge streams the output."""
    round_no = 0
    while len(runs) > cfg.max_open:
        merged = []
        for j in range(0, len(runs), cfg.max_open):
            group = runs[j:j + cfg.max_open]
            if len(group) == 1:  # a run left over: it goes on to the next round as it is
                merged.append(group[0])
                continue
            merged.append(_merge_to_disk(group, rng, cfg.shuffle, folder / f"round{round_no}-{j:06d}.tar"))
            for run in group:
                run.path.unlink()
        runs, round_no = merged, round_no + 1
    yield from interleave(runs, rng, cfg.shuffle)


def _merge_to_disk(group: list[Run], rng: random.Random, shuffle: bool, path: Path) -> Run:
    return Run(path, write_tar(interleave(group, rng, shuffle), path))


def reshuffle(samples: Iterable[dict], cfg: ReshardConfig, report: Report, folder: Path) -> tuple[Iterator[dict], int]:
    """Read all of `samples` now (pass 1); return the merged stream (pass 2, lazy) and how many samples it holds."""
    check_config(cfg)
    rng = random.Random(cfg.seed)
    runs, in_memory = spill_runs(samples, cfg, report, folder, rng)
    if in_memory is not None:
        return separate_equal_keys(in_memory), len(in_memory)
    return separate_equal_keys(merge_runs(runs, cfg, rng, folder)), sum(r.count for r in runs)


def shard_sizes(total: int, n_shards: int) -> list[int]:
    """`total` samples over `n_shards` shards, sizes differing by at most one (fewer shards if total < n_shards)."""
    return [s for s in (total // n_shards + (i < total % n_shards) for i in range(n_shards)) if s]


# ---------------------------------------------------------------- the step

def apply(samples: Iterable[dict], cfg: ReshardConfig, report: Report) -> Iterator[dict]:
    """The input, globally shuffled (shard sizes are the writer's business: see write_output)."""
    with tempfile.TemporaryDirectory(prefix="reshard-", dir=cfg.tmp_dir or None) as tmp:
        stream, _ = reshuffle(samples, cfg, report, Path(tmp))
        yield from stream


def write_output(samples: Iterable[dict], cfg: ReshardConfig, report: Report, writer: ShardWriter) -> None:
    """As the last step: shuffle, then write shards of max_count samples, or exactly n_shards even shards."""
    with tempfile.TemporaryDirectory(prefix="reshard-", dir=cfg.tmp_dir or None) as tmp:
        stream, total = reshuffle(samples, cfg, report, Path(tmp))
        if cfg.max_count is not None:
            writer.max_count = cfg.max_count
        if cfg.n_shards is None:
            for sample in stream:
                writer.write(sample)
            return
        writer.max_count, writer.max_bytes = sys.maxsize, float("inf")
        for size in shard_sizes(total, cfg.n_shards):
            for _ in range(size):
                writer.write(next(stream))
            writer.next_shard()
        for _ in stream:  # ends the merge, which checks that every run gave back all it held
            raise RuntimeError("the merge gave more samples than were read")


def main(argv: list[str] | None = None) -> None:
    from data_tools.curate.cli import run_tool

    sys.exit(run_tool("reshard", apply, ReshardConfig, argv, write_output=write_output, check=check_config))


if __name__ == "__main__":
    main()
