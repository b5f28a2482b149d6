"""WebDataset shard loading as a chain of generator stages, resumable to the exact sample.

    list shards -> split by node and worker -> read tar -> shuffle -> [skip to resume point] -> decode -> batch

Shard specs: brace expansion (`train-{000000..000099}.tar`), several sources joined by `::`
(open_clip's convention) with optional weights, local paths or folders of `.tar` files,
`http(s)://` URLs and `pipe:` commands.

Why our own stages rather than `wds.WebDataset(...)`: its pipeline keeps no position we could save,
so a resumed run would see different samples. Here each worker's stream is a pure function of
(seed, epoch, rank, worker), every batch carries the worker's position in it, and a resumed run
skips (reads, does not decode) the samples it already trained on. We still use webdataset for
what it does well: brace expansion, opening local/http/pipe URLs, and tar-to-sample grouping.
"""
from __future__ import annotations

import logging
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)


class ShardSpecError(ValueError):
    """A shard spec that names no readable shards. The message names the spec."""


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:", "s3://", "gs://"))


def expand_shard_spec(spec: str, weights: list[float] | None = None) -> list[Source]:
    """`spec` -> sources of shard URLs. Local shards must exist and be non-empty; fails naming the spec."""
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard spec: set train_data to a path, folder, URL or brace pattern of .tar shards")
    parts = [p for p in spec.split("::") if p.strip()]
    if weights is not None and len(weights) != len(parts):
        raise ShardSpecError(f"{len(weights)} weights for {len(parts)} sources in shard spec {spec!r}")
    sources = []
    for i, part in enumerate(parts):
        urls: list[str] = []
        for url in wds.shardlists.expand_urls(part):
            if not _is_remote(url) and os.path.isdir(url):
                urls += sorted(os.path.join(url, f) for f in os.listdir(url) if f.endswith(".tar"))
            else:
                urls.append(url)
        local = [u for u in urls if not _is_remote(u)]
        missing = [u for u in local if not os.path.isfile(u) or os.path.getsize(u) == 0]
        if not urls:
            raise ShardSpecError(f"shard spec {part!r} (in {spec!r}) matches no shards")
        if missing:
            raise ShardSpecError(
                f"shard spec {part!r}: {len(missing)} of {len(urls)} shards missing or empty, e.g. {missing[:3]}")
        sources.append(Source(urls, 1.0 if weights is None else float(weights[i])))
    return sources


# ---------------------------------------------------------------- stages (each a generator)

def list_epoch_shards(sources: list[Source], seed: int, epoch: int, slot: int, n_slots: int,
                      resampled: bool) -> Iterator[str]:
    """Shard URLs for one worker slot (rank * num_workers + worker) in one epoch.

    Not resampled: all shards, shuffled with (seed, epoch), dealt round-robin to the slots.
    Resampled: an endless draw with replacement, a source by weight then a shard within it.
    """
    if resampled:
        rng = random.Random(f"{seed}-{epoch}-{slot}")
        weights = [s.weight for s in sources]
        while True:
            src = rng.choices(sources, weights=weights)[0]
            yield rng.choice(src.urls)
    urls = [u for s in sources for u in s.urls]
    random.Random(f"{seed}-{epoch}").shuffle(urls)
    yield from urls[slot::n_slots]


def read_tar_samples(urls: Iterable[str], counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Shard URLs -> raw samples {"__key__", "__url__", ext: bytes}. A shard that fails to open or
    read is counted in counts["bad_shards"] and the stream goes on with the next one."""
    for url in urls:
        stream = None
        try:
            stream = wds.gopen(url, "rb")
            files = tar_file_iterator(stream, handler=_reraise)
            yield from group_by_keys(({**f, "__url__": url} for f in files), handler=_reraise)
            stream, s = None, stream
            s.close()  # a pipe: that exits non-zero (e.g. a failed download) raises here
        except Exception as e:  # noqa: BLE001 - an unreadable or truncated shard is counted, not fatal
            counts["bad_shards"] += 1
            log.warning("skipping (the rest of) shard %s: %s: %s", url, type(e).__name__, e)
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - already counted above
                    pass


def _reraise(exn):
    raise exn


def shuffle_samples(samples: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of `bufsize` samples (0 or 1: no shuffling), driven by `rng` so it is repeatable."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


def decode_samples(items: Iterable[tuple[int, int, dict]], decode: Callable[[dict], Any],
                   counts: dict[str, int], seed: str | None = None) -> Iterator[tuple[int, int, Any]]:
    """(epoch, position, raw) -> (epoch, position, decoded). A sample that fails to decode is
    counted in counts["bad_samples"] and dropped.

    With `seed`, the global RNGs are seeded from (seed, epoch, position) before each sample, so random
    augmentations are a function of the sample's place in the stream and repeat exactly on resume.
    """
    for epoch, pos, raw in items:
        if seed is not None:
            s = zlib.crc32(f"{seed}-{epoch}-{pos}".encode())
            # the CPU generator only: torch.manual_seed also seeds (and, uninitialised, traces) every
            # accelerator's generator, ~300 us a call, 10% of a CPU training step here
            torch.default_generator.manual_seed(s)
            random.seed(s)
        try:
            out = decode(raw)
        except Exception as e:  # noqa: BLE001 - one bad sample never stops a run
            counts["bad_samples"] += 1
            if counts["bad_samples"] <= 10:
                log.warning("skipping sample %s in %s: %s: %s", raw.get("__key__"), raw.get("__url__"),
                            type(e).__name__, e)
            continue
        if out is not None:
            yield epoch, pos, out


def batch_samples(items: Iterable[tuple[int, int, Any]], batch_size: int, collate: Callable[[list], Any],
                  worker: int, counts: dict[str, int]) -> Iterator[tuple[Any, dict]]:
    """Group decoded samples into batches; each batch carries this worker's position after it."""
    buf = []
    for epoch, pos, item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf), {"worker": worker, "epoch": epoch, "position": pos, **counts}
            buf = []


# ---------------------------------------------------------------- the dataset

@dataclass
class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of batches from WebDataset shards, one slice per rank and worker.

    Yields (batch, state). Pass the states to `LoaderPosition.update` in the training loop;
    `LoaderPosition.state_dict()` goes into the checkpoint and `resume_from` comes back from it.
    """
    sources: list[Source]
    decode: Callable[[dict], Any]
    collate: Callable[[list], Any]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1  # the DataLoader's num_workers (0 counts as one worker, in-process)
    resampled: bool = False
    shuffle_buffer: int = 1000
    epoch_samples: int | None = None  # per worker per epoch is epoch_samples / (world_size * num_workers)
    resume_from: dict | None = None  # LoaderPosition.state_dict() of this rank
    worker_offset: int = 0  # rotates worker identities so a resumed DataLoader continues the round-robin
    _n_slots: int = field(init=False)

    def __post_init__(self):
        n_shards = sum(len(s.urls) for s in self.sources)
        self._n_slots = self.world_size * max(1, self.num_workers)
        if not self.resampled and n_shards < self._n_slots:
            raise ShardSpecError(
                f"{n_shards} shards for {self.world_size} ranks x {max(1, self.num_workers)} workers: each worker "
                f"needs at least one. Write more shards, lower num_workers, or set resampled=true.")

    def worker_batches(self, worker: int) -> Iterator[tuple[Any, dict]]:
        """The whole stream of one logical worker: epochs one after another, from its resume point."""
        start = (self.resume_from or {}).get("workers", {}).get(worker, {})
        counts = {"bad_samples": start.get("bad_samples", 0), "bad_shards": start.get("bad_shards", 0)}
        raw = self._raw_stream(worker, start.get("epoch", 0), start.get("position", 0), counts)
        slot = self.rank * max(1, self.num_workers) + worker
        decoded = decode_samples(raw, self.decode, counts, seed=f"{self.seed}-{slot}")
        return batch_samples(decoded, self.batch_size, self.collate, worker, counts)

    def _raw_stream(self, worker: int, epoch: int, skip: int, counts: dict) -> Iterator[tuple[int, int, dict]]:
        slot = self.rank * max(1, self.num_workers) + worker
        per_worker = -(-self.epoch_samples // self._n_slots) if self.epoch_samples else None
        while True:
            urls = list_epoch_shards(self.sources, self.seed, epoch, slot, self._n_slots, self.resampled)
            rng = random.Random(f"{self.seed}-{epoch}-{slot}-shuffle")
            pos = 0
            for pos, sample in enumerate(shuffle_samples(read_tar_samples(urls, counts), self.shuffle_buffer, rng), 1):
                if pos > skip:  # resume: samples up to `skip` were trained on already; read, not decoded
                    yield epoch, pos, sample
                if per_worker is not None and pos >= per_worker:
                    break
            if pos == 0:
                raise RuntimeError(f"worker {worker} of rank {self.rank} read no samples in epoch {epoch}: "
                                   f"every shard failed ({counts['bad_shards']} bad shards); see the warnings above")
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.worker_offset) % max(1, self.num_workers)
        return self.worker_batches(worker)


class LoaderPosition:
    """The training loop's record of where each worker's stream stands, for checkpoints."""

    def __init__(self, num_workers: int, state: dict | None = None):
        self.num_workers = max(1, num_workers)
        state = state or {}
        if state and state.get("num_workers") != self.num_workers:
            raise ValueError(f"checkpoint was written with num_workers={state.get('num_workers')}; "
                             f"resume with the same value to see the same samples (now {self.num_workers})")
        self.batches = state.get("batches", 0)
        self.workers: dict[int, dict] = {int(k): dict(v) for k, v in state.get("workers", {}).items()}

    def update(self, batch_state: dict) -> None:
        self.workers[batch_state["worker"]] = {k: v for k, v in batch_state.items() if k != "worker"}
        self.batches += 1

    @property
    def bad_samples(self) -> int:
        return sum(w["bad_samples"] for w in self.workers.values())

    @property
    def bad_shards(self) -> int:
        return sum(w["bad_shards"] for w in self.workers.values())

    @property
    def epoch(self) -> int:
        return min((w["epoch"] for w in self.workers.values()), default=0)

    @property
    def worker_offset(self) -> int:
        # DataLoader hands out batches round-robin from worker 0; the next batch must come from this one.
        return self.batches % self.num_workers

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "batches": self.batches, "workers": {k: dict(v) for k, v in self.workers.items()}}


def make_loader(dataset: ShardStream, num_workers: int, position: LoaderPosition) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` that continues exactly where `position` stands."""
    dataset.resume_from = position.state_dict()
    dataset.worker_offset = position.worker_offset
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, pin_memory=torch.cuda.is_available())


def iterate_eval_batches(spec: str, decode: Callable[[dict], Any], collate: Callable[[list], Any],
                         batch_size: int) -> Iterator[Any]:
    """Every sample of a (small, held-out) shard spec once, in order, in batches; bad samples skipped."""
    counts = {"bad_samples": 0, "bad_shards": 0}
    urls = [u for s in expand_shard_spec(spec) for u in s.urls]
    raw = ((0, i, s) for i, s in enumerate(read_tar_samples(urls, counts)))
    buf = []
    for _, _, item in decode_samples(raw, decode, counts):
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)
