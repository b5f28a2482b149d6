"""The batchers on toy samples: their limits, and the resume rule (replay-stability) that mm/batching.py
writes down and the loader enforces."""
import random
from dataclasses import dataclass, field

import pytest
import torch

from mm.batching import (BatcherNotResumable, BucketBatcher, FixedBatcher, SampleTooLong, TokenPacker,
                         check_replay, estimate_bucket_bounds)
from mm.shards import LoaderPosition, ShardStream, Source, make_loader
from tests.helpers import take_batches, write_tar


def lengths(seed=0, n=400, lo=1, hi=30):
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def run(batcher, xs):
    """Feed (key=i, sample=length) for every length; returns (batches as lists of keys, batcher)."""
    out = []
    for i, x in enumerate(xs):
        out += [[k for k, _ in b] for b in batcher.add((0, i), x)]
    return out, batcher


def ident(x):
    return x


def test_fixed_batcher_groups_in_arrival_order():
    batches, b = run(FixedBatcher(3), [5] * 10)
    assert batches == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)], [(0, 6), (0, 7), (0, 8)]]
    assert b.held() == [(0, 9)]
    with pytest.raises(ValueError, match="batch_size"):
        FixedBatcher(0)


def test_bucket_batches_stay_under_the_limit_with_little_padding():
    xs = lengths()
    bounds = estimate_bucket_bounds(xs, 4)
    assert len(bounds) == 3 and bounds == sorted(bounds)
    batches, b = run(BucketBatcher(ident, max_total=120, bounds=bounds, max_held=50), xs)
    emitted = [k for batch in batches for k in batch]
    assert len(emitted) == len(set(emitted)) and len(emitted) + len(b.held()) == len(xs)  # none lost or repeated
    for batch in batches:
        ls = [xs[i] for _, i in batch]
        assert max(ls) * len(ls) <= 120  # padded length within the limit
        assert len({sum(x > e for e in bounds) for x in ls}) == 1  # one bucket per batch
    padding = sum(max(xs[i] for _, i in bt) * len(bt) - sum(xs[i] for _, i in bt) for bt in batches)
    assert padding / sum(xs[i] for _, i in emitted) < 0.25
    with pytest.raises(SampleTooLong, match="over the batch limit"):
        BucketBatcher(ident, max_total=10, bounds=[]).add((0, 0), 11)


def test_bucket_batcher_max_held_bounds_memory():
    b = BucketBatcher(ident, max_total=1000, bounds=[10, 20], max_held=7)
    run(b, lengths(n=100))
    assert len(b.held()) <= 7


def test_token_packer_fills_sequences():
    xs = lengths(hi=20)
    batches, b = run(TokenPacker(ident, max_tokens=32, open_packs=4), xs)
    totals = [sum(xs[i] for _, i in bt) for bt in batches]
    assert max(totals) <= 32 and sum(totals) / len(totals) > 0.85 * 32  # packs are nearly full
    emitted = [k for bt in batches for k in bt]
    assert len(emitted) == len(set(emitted)) and len(emitted) + len(b.held()) == len(xs)
    with pytest.raises(SampleTooLong, match="33 tokens"):
        TokenPacker(ident, max_tokens=32).add((0, 0), 33)


@pytest.mark.parametrize("make", [lambda: FixedBatcher(5),
                                  lambda: BucketBatcher(ident, 60, [8, 16, 24], max_held=12),
                                  lambda: TokenPacker(ident, 40, open_packs=3)],
                         ids=["fixed", "bucket", "packer"])
def test_every_batcher_is_replay_stable_at_every_cut(make):
    """Cut after every sample: a fresh batcher fed only the held samples emits nothing, holds the same,
    and from then on emits exactly what the uninterrupted batcher emits."""
    xs = lengths(seed=3, n=150)
    full, _ = run(make(), xs)
    for cut in range(1, len(xs)):
        before, b = run(make(), xs[:cut])
        fresh = make()
        check_replay(fresh, [(k, xs[k[1]]) for k in b.held()])
        after = [[k for k, _ in bt] for i in range(cut, len(xs)) for bt in fresh.add((0, i), xs[i])]
        assert before + after == full, f"cut after {cut} samples"


@dataclass
class RampBatcher:
    """Batch-size warmup done wrong: the n-th batch (from 0) takes the oldest n + 1 of a buffer of 2(n + 1)
    samples, and a fresh batcher has forgotten n."""
    emitted: int = field(default=0, init=False)
    buf: list = field(default_factory=list, init=False)

    def add(self, key, sample):
        self.buf.append((key, sample))
        size = self.emitted + 1
        if len(self.buf) < 2 * size:
            return []
        batch, self.buf = self.buf[:size], self.buf[size:]
        self.emitted += 1
        return [batch]

    def held(self):
        return [k for k, _ in self.buf]


def collate(items):
    return torch.tensor(items)


def test_a_batcher_that_breaks_the_rule_fails_loudly_on_resume(tmp_path):
    """After two batches the ramp holds 2 samples; replayed into a fresh (reset) ramp they make it emit a
    batch, so the stream raises instead of quietly training on other batches than the uninterrupted run."""
    write_tar(tmp_path / "a.tar", [{"__key__": f"{i:03d}", "cls": str(i)} for i in range(60)])

    def stream():
        return ShardStream([Source([str(tmp_path / "a.tar")])], decode_cls, collate, RampBatcher(),
                           num_workers=0, shuffle_buffer=0)
    position = LoaderPosition(0)
    loader = iter(make_loader(stream(), 0, position))
    for _ in range(2):
        position.update(next(loader)[1])
    assert position.state_dict()["workers"][0]["held"] == [[0, 4], [0, 5]]  # positions count from 1
    with pytest.raises(BatcherNotResumable, match="RampBatcher emitted 1 batches while the samples it held were replayed on resume, where the checkpoint says 0"):
        next(iter(make_loader(stream(), 0, LoaderPosition(0, position.state_dict()))))


def decode_cls(sample):
    return int(sample["cls"])


def decode_len(sample):
    return int(sample["cls"]), int(sample["len"])


def second(item):
    return item[1]


def collate_cls(items):
    return torch.tensor([c for c, _ in items])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_between_two_batches_of_one_sample_loses_nothing(tmp_path, num_workers):
    """Lengths 5, 10, 5, 10, ... into packs of 10 with one open pack: every 10 closes the open pack AND fills one
    of its own, two batches from one sample. Cut after every batch: the resumed stream gives the same batches."""
    for part in range(2):
        write_tar(tmp_path / f"p{part}.tar", [{"__key__": f"{i:03d}", "cls": str(i), "len": str(5 if i % 2 == 0 else 10)}
                                             for i in range(part * 20, part * 20 + 20)])

    def stream():
        return ShardStream([Source([str(tmp_path / "p0.tar"), str(tmp_path / "p1.tar")])], decode_len, collate_cls,
                           TokenPacker(second, max_tokens=10, open_packs=1), num_workers=num_workers,
                           shuffle_buffer=0)

    def take(position, n):
        return take_batches(stream(), position, n, num_workers)
    full = take(LoaderPosition(num_workers), 30)
    pending_seen = False
    for cut in range(1, 12):
        first = LoaderPosition(num_workers)
        part = take(first, cut)
        pending_seen |= any(w["pending"] for w in first.state_dict()["workers"].values())
        assert part + take(LoaderPosition(num_workers, first.state_dict()), 30 - cut) == full, f"cut after {cut}"
    assert pending_seen, "no cut fell between two batches of one sample"
