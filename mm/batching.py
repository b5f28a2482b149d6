"""Batchers: the last stage of the loader, which groups decoded samples into batches.

    FixedBatcher(batch_size)                      B samples a batch (CLIP)
    BucketBatcher(length, max_total, bounds)      samples of similar length, up to max_total padded length
                                                  a batch (ASR: seconds of audio; lhotse-style buckets)
    TokenPacker(length, max_tokens)               samples packed into one sequence of up to max_tokens
                                                  (vision chat; the collate keeps attention per sample)

Each is generic over a `length(sample) -> float` function. `ShardStream(batcher=...)` takes any object
with the same two methods (a protocol, not a base class):

    add(key, sample) -> list of batches this sample completed (each a list of (key, sample), oldest first)
    held() -> keys of the samples it holds but has not put in a batch yet, in arrival order

A key is the sample's place in its worker's stream, (epoch, position). A sample too long for any
batch raises `SampleTooLong`; the loader counts it (`too_long`) and goes on.

THE RESUME RULE. A batcher may hold samples across batches (a bucket, an open pack), so "the position
of the last sample read" is not where a resumed run may start: the held samples would be lost. So
every batch records, for its worker, the last position read, the keys still held, and (when one sample
completed several batches at once) the keys of the batches still to come from it, "pending". A resumed
worker re-reads its stream from the oldest of those keys, skips (reads, does not decode) every sample up to
the last position read except the held and pending ones, decodes those again (same per-sample seed, so
same augmentation) and feeds them, in arrival order, to a fresh batcher; then it goes on with new samples.
For that to give exactly the uninterrupted run's batches, a batcher must be *replay-stable*:

    fed only those samples, in arrival order, a fresh batcher emits exactly the pending batches and ends
    holding exactly the held samples, in the same state.

All three batchers here are (their docstrings say why), `check_replay` tests any batcher for it, and the
loader checks it on every resume, raising `BatcherNotResumable` otherwise: a batcher that breaks the rule
fails loudly instead of changing the data.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

Key = Hashable  # (epoch, position) in the loader
Item = tuple[Key, Any]


class SampleTooLong(ValueError):
    """A sample longer than any batch may be. The loader skips and counts it."""


class BatcherNotResumable(RuntimeError):
    """A batcher broke the resume rule: replaying its held and pending samples gave other batches than the
    pending ones, or left it holding other samples."""


@dataclass
class FixedBatcher:
    """`batch_size` samples a batch, in arrival order. Replay-stable: it holds less than one batch."""
    batch_size: int
    _buf: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def add(self, key: Key, sample: Any) -> list[list[Item]]:
        self._buf.append((key, sample))
        if len(self._buf) < self.batch_size:
            return []
        batch, self._buf = self._buf, []
        return [batch]

    def held(self) -> list[Key]:
        return [k for k, _ in self._buf]


@dataclass
class BucketBatcher:
    """Duration buckets in the style of lhotse's DynamicBucketingSampler, deterministic.

    A sample goes to the bucket of its length (`bounds` are the upper edges of all but the last
    bucket, e.g. seconds). A bucket becomes a batch when the next sample would push its padded
    length (count x longest, what the GPU computes) over `max_total`, or when `max_held` samples
    are held in all and it is the fullest. So batches hold up to `max_total` (e.g. seconds of audio)
    of similar-length samples and little padding.

    Replay-stable: a bucket's held samples arrived after its last batch and each fitted when it came,
    so they fit again; and replay holds fewer samples than the original did at every point, so the
    `max_held` rule cannot fire either.
    """
    length: Callable[[Any], float]
    max_total: float
    bounds: list[float]
    max_held: int = 10_000
    _buckets: list[list] = field(default_factory=list, init=False, repr=False)
    _longest: list[float] = field(default_factory=list, init=False, repr=False)  # per bucket, of what it holds
    _n_held: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        if sorted(self.bounds) != list(self.bounds):
            raise ValueError(f"bucket bounds must be ascending, got {self.bounds}")
        self._buckets = [[] for _ in range(len(self.bounds) + 1)]
        self._longest = [0.0] * len(self._buckets)

    def add(self, key: Key, sample: Any) -> list[list[Item]]:
        n = self.length(sample)
        if n > self.max_total:
            raise SampleTooLong(f"length {n:g} is over the batch limit max_total={self.max_total:g}")
        b = bisect.bisect_left(self.bounds, n)
        bucket, out = self._buckets[b], []
        if bucket and max(self._longest[b], n) * (len(bucket) + 1) > self.max_total:
            out.append(self._take(b))
        bucket.append((key, sample))
        self._longest[b] = max(self._longest[b], n)
        self._n_held += 1
        if self._n_held > self.max_held:
            out.append(self._take(max(range(len(self._buckets)), key=lambda i: len(self._buckets[i]))))
        return out

    def _take(self, b: int) -> list[Item]:
        batch = list(self._buckets[b])
        self._buckets[b].clear()
        self._longest[b] = 0.0
        self._n_held -= len(batch)
        return batch

    def held(self) -> list[Key]:
        return sorted(k for b in self._buckets for k, _ in b)


@dataclass
class TokenPacker:
    """Packs samples into sequences of up to `max_tokens` tokens: one packed sequence a batch.

    First fit over up to `open_packs` open packs, kept in the order they were opened: a sample goes
    into the first pack it fits in; when none has room, a new pack opens, and if `open_packs` are
    open already, the fullest (the oldest among equals) is emitted first. A pack that is exactly full
    is emitted at once.

    Replay-stable: a held pack's samples all arrived after it opened and are all still held, so in
    replay each sample meets the same held packs with the same contents (a subset of the packs open
    originally, in the same order), fits the same one, or opens a pack without emitting, since fewer
    packs are open in replay than were then.
    """
    length: Callable[[Any], int]
    max_tokens: int
    open_packs: int = 8
    _packs: list[list] = field(default_factory=list, init=False, repr=False)
    _used: list[int] = field(default_factory=list, init=False, repr=False)

    def add(self, key: Key, sample: Any) -> list[list[Item]]:
        n = self.length(sample)
        if n > self.max_tokens:
            raise SampleTooLong(f"{n} tokens, over max_tokens={self.max_tokens}")
        out = []
        i = next((i for i, used in enumerate(self._used) if used + n <= self.max_tokens), None)
        if i is None:
            if len(self._packs) >= self.open_packs:
                out.append(self._pop(max(range(len(self._used)), key=lambda j: (self._used[j], -j))))
            self._packs.append([])
            self._used.append(0)
            i = len(self._packs) - 1
        self._packs[i].append((key, sample))
        self._used[i] += n
        if self._used[i] == self.max_tokens:
            out.append(self._pop(i))
        return out

    def _pop(self, i: int) -> list[Item]:
        self._used.pop(i)
        return self._packs.pop(i)

    def held(self) -> list[Key]:
        return sorted(k for p in self._packs for k, _ in p)


def estimate_bucket_bounds(lengths: Iterable[float], num_buckets: int) -> list[float]:
    """Upper edges of `num_buckets` buckets holding about equal total length (lhotse's
    `estimate_duration_buckets`), from a sample of lengths, e.g. the first few thousand of a manifest."""
    xs = sorted(lengths)
    if num_buckets < 2 or not xs:
        return []
    total, edges, acc = sum(xs), [], 0.0
    for x in xs:
        acc += x
        if acc >= total * (len(edges) + 1) / num_buckets and len(edges) < num_buckets - 1:
            edges.append(x)
    return sorted(set(edges))


def check_replay(batcher: Any, replayed: list[Item], held: list[Key] | None = None,
                 pending: list[list[Key]] | None = None) -> list[list[Item]]:
    """Feed `replayed` (the (key, sample)s of a checkpoint's held and pending keys, arrival order) to a fresh
    batcher: it must emit exactly the `pending` batches and end holding exactly `held` (defaults: nothing
    pending, every replayed key held). Returns the batches it emitted; BatcherNotResumable otherwise."""
    pending = pending or []
    held = sorted(k for k, _ in replayed) if held is None else sorted(held)
    emitted = [b for key, sample in replayed for b in batcher.add(key, sample)]
    if [[k for k, _ in b] for b in emitted] != [list(b) for b in pending]:
        raise BatcherNotResumable(
            f"{type(batcher).__name__} emitted {len(emitted)} batches while the samples it held were replayed on "
            f"resume, where the checkpoint says {len(pending)}; see the resume rule in mm/batching.py")
    if batcher.held() != held:
        missing = len(set(held) - set(batcher.held()))
        raise BatcherNotResumable(
            f"{type(batcher).__name__} holds {len(batcher.held())} samples after the replay on resume, the "
            f"checkpoint says {len(held)} ({missing} of those could not be read and decoded again, or were not "
            f"taken back); see the resume rule in mm/batching.py")
    return emitted
