"""Sample streams from WebDataset tar shards and JSONL manifests, as a chain of generator stages,
resumable to the exact sample:

    list shards -> split by node and worker -> read (tar | jsonl) -> shuffle
        -> [skip what was trained, replay what a batcher held] -> decode -> batch (a batcher)

Specs: brace expansion (`train-{000000..000099}.tar`), several sources joined by `::` (open_clip's
convention) with optional weights, local paths or folders of `.tar` / `.jsonl` files, `http(s)://`
URLs and `pipe:` commands. A `.jsonl` source is a manifest: each line is one sample (a user's chat
JSONL or audio manifest, read as it is; paths inside it are relative to the manifest's folder).

Why our own stages rather than `wds.WebDataset(...)`: its pipeline keeps no position we could save,
so a resumed run would see different samples. Here each worker's stream is a pure function of
(seed, epoch, rank, worker), every batch carries the worker's position in it and the samples its
batcher still holds, and a resumed run skips (reads, does not decode) what it already trained on,
following the resume rule written in mm/batching.py. We still use webdataset for what it does well:
brace expansion, opening local/http/pipe URLs, and grouping tar members into samples.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from mm.batching import SampleTooLong, check_replay

log = logging.getLogger(__name__)

COUNTS = ("bad_samples", "bad_shards", "too_long")  # what a stream counts and skips, never fatal
SHARD_EXTENSIONS = (".tar", ".tgz", ".tar.gz", ".jsonl")


class ShardSpecError(ValueError):
    """A shard spec that names no readable shards. The message names the spec."""


class TruncatedShard(IOError):
    """A tar shard that ends without tar's end-of-archive block: cut short, or corrupt past some point."""


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    """A URL that is not a local path (read over the network or through a command)."""
    return url.startswith(("http://", "https://", "pipe:", "s3://", "gs://"))


def is_manifest(url: str) -> bool:
    return url.split("?")[0].endswith(".jsonl")


def expand_shard_spec(spec: str, weights: list[float] | None = None) -> list[Source]:
    """`spec` -> sources of shard URLs. Local shards must exist and be non-empty; fails naming the spec."""
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard spec: set train_data to a path, folder, URL or brace pattern of .tar "
                             "shards or .jsonl manifests")
    parts = [p for p in spec.split("::") if p.strip()]
    if weights is not None and len(weights) != len(parts):
        raise ShardSpecError(f"{len(weights)} weights for {len(parts)} sources in shard spec {spec!r}")
    sources = []
    for i, part in enumerate(parts):
        urls: list[str] = []
        for url in wds.shardlists.expand_urls(part):
            if not is_remote(url) and os.path.isdir(url):
                urls += sorted(os.path.join(url, f) for f in os.listdir(url) if f.endswith(SHARD_EXTENSIONS))
            else:
                urls.append(url)
        local = [u for u in urls if not is_remote(u)]
        missing = [u for u in local if not os.path.isfile(u) or os.path.getsize(u) == 0]
        if not urls:
            raise ShardSpecError(f"shard spec {part!r} (in {spec!r}) matches no shards")
        if missing:
            raise ShardSpecError(
                f"shard spec {part!r}: {len(missing)} of {len(urls)} shards missing or empty, e.g. {missing[:3]}")
        sources.append(Source(urls, 1.0 if weights is None else float(weights[i])))
    return sources


# ---------------------------------------------------------------- stages (each a generator)

@dataclass(frozen=True)
class Unit:
    """What one worker reads next: a shard, or every `stride`-th line (from `offset`) of a manifest."""
    url: str
    offset: int = 0
    stride: int = 1


def line_split(url: str, n_files: int, n_slots: int) -> bool:
    """Whether a manifest is split by line (every slot reads it, keeping every n-th line) rather than
    dealt whole: so when its source has fewer files than there are worker slots."""
    return is_manifest(url) and n_files < n_slots


def list_epoch_units(sources: list[Source], seed: int, epoch: int, slot: int, n_slots: int,
                     resampled: bool) -> Iterator[Unit]:
    """What one worker slot (rank * num_workers + worker) reads in one epoch.

    Not resampled: all shards, shuffled with (seed, epoch), dealt round-robin to the slots.
    Resampled: an endless draw with replacement, a source by weight then a shard within it.
    A manifest in a source with fewer files than slots is split by line instead (`line_split`),
    so one JSONL file feeds any number of workers.
    """
    def unit(url: str, n_files: int) -> Unit:
        return Unit(url, slot, n_slots) if line_split(url, n_files, n_slots) else Unit(url)

    if resampled:
        rng = random.Random(f"{seed}-{epoch}-{slot}")
        weights = [s.weight for s in sources]
        while True:
            src = rng.choices(sources, weights=weights)[0]
            yield unit(rng.choice(src.urls), len(src.urls))
    urls = [(u, len(s.urls)) for s in sources for u in s.urls]
    random.Random(f"{seed}-{epoch}").shuffle(urls)
    units = [unit(u, n) for u, n in urls]
    yield from (u for u in units if u.stride > 1)  # line-split manifests: every slot reads its lines of each
    yield from [u for u in units if u.stride == 1][slot::n_slots]


class _LastRead:
    """Wraps a TarFile's underlying stream to remember the last block read. tarfile (stream mode) ends
    its member loop without an error when a header block is cut short, empty or garbled, which would lose
    the rest of a shard silently; the block it read last tells a real end-of-archive (all zeros) apart."""

    def __init__(self, raw):
        self._raw, self.last = raw, b""

    def read(self, *args):
        self.last = self._raw.read(*args)
        return self.last

    def __getattr__(self, name):
        return getattr(self._raw, name)


def read_tar_members(stream, url: str) -> Iterator[dict]:
    """Regular files of a tar stream as {"fname", "data", "__url__"}; TruncatedShard if it ends without
    the end-of-archive block. (webdataset's tar_file_iterator, plus that check.)"""
    tf = tarfile.open(fileobj=stream, mode="r|*")
    tf.fileobj = tail = _LastRead(tf.fileobj)
    try:
        for info in tf:
            if info.isreg() and not info.name.startswith("__"):
                yield {"fname": info.name, "data": tf.extractfile(info).read(), "__url__": url}
            tf.members = []  # stream mode keeps every TarInfo otherwise
        if len(tail.last) != tarfile.BLOCKSIZE or any(tail.last):
            raise TruncatedShard("no end-of-archive block: the shard is cut short or corrupt past this point")
    except Exception:
        yield {}  # group_by_keys' end-of-shard marker: hand on the last sample read whole (if incomplete, it
        raise     # fails to decode and is counted as a bad sample), then count the shard as bad


def read_jsonl_lines(stream, unit: Unit) -> Iterator[dict]:
    """Lines `offset`, `offset + stride`, ... of a JSONL manifest as raw samples
    {"__key__": "<stem>:<line>", "__url__", "__root__": the manifest's folder, "json": line bytes}."""
    stem = os.path.basename(unit.url).rsplit(".", 1)[0]
    root = "" if is_remote(unit.url) else os.path.dirname(os.path.abspath(unit.url))
    for i, line in enumerate(stream):
        if i % unit.stride == unit.offset and line.strip():
            yield {"__key__": f"{stem}:{i + 1}", "__url__": unit.url, "__root__": root, "json": line}


def read_samples(units: Iterable[Unit | str], counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Shards and manifests -> raw samples. A shard that fails to open, read or end properly is counted
    in counts["bad_shards"] (its samples up to the fault are kept) and the stream goes on with the next."""
    for unit in units:
        unit = Unit(unit) if isinstance(unit, str) else unit
        stream = None
        try:
            stream = wds.gopen(unit.url, "rb")
            if is_manifest(unit.url):
                yield from read_jsonl_lines(stream, unit)
            else:
                yield from group_by_keys(read_tar_members(stream, unit.url), handler=_reraise)
            stream, s = None, stream
            s.close()  # a pipe: that exits non-zero (e.g. a failed download) raises here
        except Exception as e:  # noqa: BLE001 - an unreadable or truncated shard is counted, not fatal
            counts["bad_shards"] += 1
            log.warning("skipping (the rest of) shard %s: %s: %s", unit.url, type(e).__name__, e)
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


def skip_trained(items: Iterable[tuple[int, int, dict]], last: tuple[int, int],
                 held: set[tuple[int, int]]) -> Iterator[tuple[int, int, dict, bool]]:
    """Resume: drop the samples up to `last` (epoch, position) that were trained on; pass the `held`
    ones (a batcher held them, untrained) flagged as replays; then everything after `last`."""
    for epoch, pos, raw in items:
        if (epoch, pos) > last:
            yield epoch, pos, raw, False
        elif (epoch, pos) in held:
            yield epoch, pos, raw, True


def decode_samples(items: Iterable[tuple], decode: Callable[[dict], Any], counts: dict[str, int],
                   seed: str | None = None) -> Iterator[tuple]:
    """(epoch, position, raw, *rest) -> (epoch, position, key, decoded, *rest). A sample that fails to
    decode is counted in counts["bad_samples"] and dropped; one the decoder finds too long (SampleTooLong,
    e.g. AudioTooLong) in counts["too_long"].

    With `seed`, the global RNGs are seeded from (seed, epoch, position) before each sample, so random
    augmentations are a function of the sample's place in the stream and repeat exactly on resume.
    """
    for epoch, pos, raw, *rest in items:
        if seed is not None:
            s = zlib.crc32(f"{seed}-{epoch}-{pos}".encode())
            # the CPU generator only: torch.manual_seed also seeds (and, uninitialised, traces) every
            # accelerator's generator, ~300 us a call, 10% of a CPU training step here
            torch.default_generator.manual_seed(s)
            random.seed(s)
        try:
            out = decode(raw)
        except SampleTooLong:  # a good sample over the length limit (e.g. AudioTooLong): counted apart
            counts["too_long"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - one bad sample never stops a run
            counts["bad_samples"] += 1
            if counts["bad_samples"] <= 10:
                log.warning("skipping sample %s in %s: %s: %s", raw.get("__key__"), raw.get("__url__"),
                            type(e).__name__, e)
            continue
        if out is not None:
            yield (epoch, pos, raw.get("__key__"), out, *rest)


def batch_samples(items: Iterable[tuple], batcher, collate: Callable[[list], Any], worker: int,
                  counts: dict[str, int], resume: dict | None = None) -> Iterator[tuple[Any, dict]]:
    """Feed decoded samples to `batcher`; collate each batch it completes. Each batch carries this worker's
    state after it (the resume rule, mm/batching.py): the last position read, the keys still held, the keys
    of the batches the same sample completed after this one ("pending"), the counts, and its sample keys.
    On a resume (`resume`: the state a checkpoint recorded), the replayed samples (flagged) go back into the
    batcher first, which must give exactly the recorded pending batches and held keys."""
    ids: dict = {}
    replayed, replaying = [], True
    for epoch, pos, sample_id, sample, replay in items:
        key = (epoch, pos)
        ids[key] = sample_id
        if replay:
            replayed.append((key, sample))
            continue
        if replaying:  # the first new sample after a resume: first the batches the replay completes
            state = resume or {}
            held = [tuple(k) for k in state.get("held", [])]
            pending = [[tuple(k) for k in b] for b in state.get("pending", [])]
            ready = check_replay(batcher, replayed, held, pending)
            yield from _emit(ready, batcher, collate, ids, {"worker": worker, "epoch": state.get("epoch", 0),
                                                             "position": state.get("position", 0)}, counts)
            replayed, replaying = [], False
        try:
            ready = batcher.add(key, sample)
        except SampleTooLong as e:
            counts["too_long"] += 1
            log.warning("skipping sample %s: %s (%d too long so far)", sample_id, e, counts["too_long"])
            del ids[key]
            continue
        yield from _emit(ready, batcher, collate, ids, {"worker": worker, "epoch": epoch, "position": pos}, counts)


def _emit(ready: list, batcher, collate, ids: dict, where: dict, counts: dict) -> Iterator[tuple[Any, dict]]:
    """Collate the batches one `add` completed, each with the state a checkpoint after it needs."""
    for i, batch in enumerate(ready):
        pending = [[list(k) for k, _ in b] for b in ready[i + 1:]]
        state = {**where, "held": [list(k) for k in batcher.held()], "pending": pending, **counts,
                 "keys": [ids.pop(k) for k, _ in batch]}
        yield collate([s for _, s in batch]), state


# ---------------------------------------------------------------- the dataset

def check_stream_config(cfg) -> None:
    """A recipe config's stream settings that the types cannot check (train_weights, resampled,
    epoch_samples): a ConfigError naming the keys, at start rather than when the stream is built."""
    from mm.config import ConfigError
    if cfg.train_weights and not cfg.resampled:
        raise ConfigError("--train_weights needs --resampled=true (weights choose shards when resampling)")
    if cfg.resampled and cfg.epoch_samples <= 0:
        raise ConfigError("--resampled=true needs --epoch_samples > 0: a resumed run re-reads (without decoding) "
                          "its current epoch up to where it stopped, and an endless epoch is the whole run")


@dataclass
class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of batches from shards and manifests, one slice per rank and worker.

    Yields (batch, state). Pass the states to `LoaderPosition.update` in the training loop;
    `LoaderPosition.state_dict()` goes into the checkpoint and `resume_from` comes back from it.
    `batcher` is a prototype (FixedBatcher, BucketBatcher, TokenPacker, or any object following
    mm/batching.py's protocol and resume rule); each worker starts from a copy of it, as given (empty).
    """
    sources: list[Source]
    decode: Callable[[dict], Any]
    collate: Callable[[list], Any]
    batcher: Any
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
        self._n_slots = self.world_size * max(1, self.num_workers)
        if self.resampled and not self.epoch_samples:
            raise ShardSpecError(
                "resampled=true needs epoch_samples > 0: a resumed run re-reads (without decoding) its current "
                "epoch up to where it stopped, and without epoch_samples that epoch is the whole run so far")
        split = [line_split(u, len(s.urls), self._n_slots) for s in self.sources for u in s.urls]
        if not self.resampled and not any(split) and len(split) < self._n_slots:
            raise ShardSpecError(
                f"{len(split)} shards for {self.world_size} ranks x {max(1, self.num_workers)} workers: each worker "
                f"needs at least one. Write more shards, lower num_workers, or set resampled=true.")

    def worker_batches(self, worker: int) -> Iterator[tuple[Any, dict]]:
        """The whole stream of one logical worker: epochs one after another, from its resume point."""
        start = (self.resume_from or {}).get("workers", {}).get(worker, {})
        counts = {k: start.get(k, 0) for k in COUNTS}
        last = (start.get("epoch", 0), start.get("position", 0))
        held = {tuple(k) for k in start.get("held", [])} | {tuple(k) for b in start.get("pending", []) for k in b}
        raw = self._raw_stream(worker, min([last[0], *(e for e, _ in held)]), counts)
        slot = self.rank * max(1, self.num_workers) + worker
        decoded = decode_samples(skip_trained(raw, last, held), self.decode, counts, seed=f"{self.seed}-{slot}")
        return batch_samples(decoded, copy.deepcopy(self.batcher), self.collate, worker, counts, start)

    def _raw_stream(self, worker: int, epoch: int, counts: dict) -> Iterator[tuple[int, int, dict]]:
        slot = self.rank * max(1, self.num_workers) + worker
        per_worker = -(-self.epoch_samples // self._n_slots) if self.epoch_samples else None
        while True:
            units = list_epoch_units(self.sources, self.seed, epoch, slot, self._n_slots, self.resampled)
            rng = random.Random(f"{self.seed}-{epoch}-{slot}-shuffle")
            pos = 0
            for pos, sample in enumerate(shuffle_samples(read_samples(units, counts), self.shuffle_buffer, rng), 1):
                yield epoch, pos, sample
                if per_worker is not None and pos >= per_worker:
                    break
            if pos == 0:
                raise RuntimeError(f"worker {worker} of rank {self.rank} read no samples in epoch {epoch}: every shard "
                                   f"failed ({counts['bad_shards']} bad shards; see the warnings above), or its "
                                   f"manifests have fewer lines than there are ranks x workers")
            epoch += 1

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
        self.workers[batch_state["worker"]] = {k: v for k, v in batch_state.items() if k not in ("worker", "keys")}
        self.batches += 1

    def count(self, name: str) -> int:
        """A count summed over workers: bad_samples, bad_shards or too_long."""
        return sum(w.get(name, 0) for w in self.workers.values())

    @property
    def bad_samples(self) -> int:
        return self.count("bad_samples")

    @property
    def bad_shards(self) -> int:
        return self.count("bad_shards")

    @property
    def epoch(self) -> int:
        return min((w["epoch"] for w in self.workers.values()), default=0)

    @property
    def worker_offset(self) -> int:
        # DataLoader hands out batches round-robin from worker 0; the next batch must come from this one.
        return self.batches % self.num_workers

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "batches": self.batches,
                "workers": {k: dict(v) for k, v in self.workers.items()}}


def make_loader(dataset: ShardStream, num_workers: int, position: LoaderPosition) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` that continues exactly where `position` stands."""
    dataset.resume_from = position.state_dict()
    dataset.worker_offset = position.worker_offset
    # its own generator: DataLoader draws a base seed when iterated, which must not move the global RNG
    # (restored on resume); our stages seed themselves per sample and need no DataLoader seed
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())


def iterate_eval_batches(spec: str, decode: Callable[[dict], Any], collate: Callable[[list], Any],
                         batch_size: int, rank: int = 0, world_size: int = 1,
                         sort_key: Callable[[Any], Any] | None = None, sort_window: int = 16) -> Iterator[Any]:
    """Every sample of a (small, held-out) spec once, in order, in batches; bad samples skipped.
    With several ranks, rank r takes samples r, r + world_size, ... (the others are read, not decoded).
    sort_key: each run of sort_window x batch_size decoded samples is sorted by it before batching (e.g. by
    duration, so that a batch's clips are padded to similar lengths): the order changes, the samples do not."""
    counts = dict.fromkeys(COUNTS, 0)
    urls = [u for s in expand_shard_spec(spec) for u in s.urls]
    raw = ((0, i, s) for i, s in enumerate(read_samples(urls, counts)) if i % world_size == rank)
    window = batch_size * (sort_window if sort_key is not None else 1)
    buf = []
    for _, _, _, item in decode_samples(raw, decode, counts):
        buf.append(item)
        if len(buf) == window:
            yield from _batches(buf, batch_size, collate, sort_key)
            buf = []
    yield from _batches(buf, batch_size, collate, sort_key)


def _batches(items: list, batch_size: int, collate: Callable[[list], Any], sort_key) -> Iterator[Any]:
    items = sorted(items, key=sort_key) if sort_key is not None else items
    for i in range(0, len(items), batch_size):
        yield collate(items[i:i + batch_size])
