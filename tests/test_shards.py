"""The loader's stages: spec expansion, worker splitting, corrupt and truncated shards, JSONL manifests,
determinism, and exact resume with every batcher (the resume rule in mm/batching.py)."""
import functools
import json
from collections import Counter

import pytest
import torch

from mm.batching import BucketBatcher, FixedBatcher, TokenPacker
from mm.shards import (LoaderPosition, ShardSpecError, ShardStream, expand_shard_spec, iterate_eval_batches,
                       list_epoch_units, make_loader, read_samples)
from tests.helpers import png_bytes, take_batches, write_tar

N_SHARDS, PER_SHARD, CORRUPT = 4, 10, 13


def decode(sample):
    """Tar samples: the label, after decoding the PNG (corrupt bytes raise). Manifest lines: the label."""
    if "json" in sample and "png" not in sample:
        return int(json.loads(sample["json"])["cls"])
    from PIL import Image
    import io
    Image.open(io.BytesIO(sample["png"])).load()
    return int(sample["cls"])


def length(label: int) -> int:
    """A toy length for the bucket batcher and the packer: 1..7 tokens / seconds."""
    return 1 + label % 7


def collate(items):
    return torch.tensor(items)


@pytest.fixture()
def shards(tmp_path):
    """4 shards x 10 samples labelled 0..39; sample 13 has corrupt image bytes."""
    for s in range(N_SHARDS):
        samples = []
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            img = b"\x89PNG this is not a png" if i == CORRUPT else png_bytes((i, 0, 0))
            samples.append({"__key__": f"{i:04d}", "png": img, "cls": str(i)})
        write_tar(tmp_path / f"part-{s:02d}.tar", samples)
    return tmp_path


@pytest.fixture()
def manifest(tmp_path):
    """One JSONL manifest of samples 0..39 (line 14 is not JSON), and a second of 40..59."""
    root = tmp_path / "manifests"
    root.mkdir()
    lines = [json.dumps({"cls": i}) if i != CORRUPT else "{not json" for i in range(40)]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"cls": i}) for i in range(40, 60)) + "\n\n")
    return root


def labels_of(batches):
    return [int(x) for b in batches for x in b]


def test_brace_expansion_sources_and_folders(shards):
    [src] = expand_shard_spec(str(shards / "part-{00..03}.tar"))
    assert [p.split("/")[-1] for p in src.urls] == [f"part-{i:02d}.tar" for i in range(4)]
    a, b = expand_shard_spec(f"{shards}/part-{{00..01}}.tar::{shards}", weights=[3, 1])
    assert (len(a.urls), a.weight, len(b.urls), b.weight) == (2, 3.0, 4, 1.0)


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty shard spec"),
    ("{root}/nothing-{{0..3}}.tar", "nothing-{{0..3}}.tar': 4 of 4 shards missing"),
    ("{root}/empty", "matches no shards"),
])
def test_missing_or_empty_spec_fails_naming_it(shards, spec, fragment):
    (shards / "empty").mkdir()
    with pytest.raises(ShardSpecError, match=fragment.format(root=shards).replace("{", r"\{").replace("}", r"\}")):
        expand_shard_spec(spec.format(root=shards))


def test_zero_byte_shard_is_reported(shards):
    (shards / "part-04.tar").write_bytes(b"")
    with pytest.raises(ShardSpecError, match=r"1 of 5 shards missing or empty, e.g. \[.*part-04.tar'\]"):
        expand_shard_spec(str(shards / "part-{00..04}.tar"))


def test_epoch_shards_split_by_node_and_worker_without_overlap(shards):
    [src] = expand_shard_spec(str(shards))
    slots = [[u.url for u in list_epoch_units([src], 1, 0, s, 4, False)] for s in range(4)]
    assert sorted(u for s in slots for u in s) == sorted(src.urls)
    assert all(len(s) == 1 for s in slots)
    again = [[u.url for u in list_epoch_units([src], 1, 1, s, 4, False)] for s in range(4)]
    assert again != slots  # a new epoch deals shards differently


def test_resampled_draws_follow_weights(shards):
    a, b = expand_shard_spec(f"{shards}/part-00.tar::{shards}/part-01.tar", weights=[3, 1])
    stream = list_epoch_units([a, b], seed=0, epoch=0, slot=0, n_slots=1, resampled=True)
    counts = Counter(next(stream).url.split("/")[-1] for _ in range(4000))
    assert 0.7 < counts["part-00.tar"] / 4000 < 0.8


def test_resampled_needs_epoch_samples(shards):
    """An endless epoch would make a resume re-read the whole run so far: refused, with the reason."""
    with pytest.raises(ShardSpecError, match="resampled=true needs epoch_samples"):
        ShardStream(expand_shard_spec(str(shards)), decode, collate, FixedBatcher(2), resampled=True)
    ShardStream(expand_shard_spec(str(shards)), decode, collate, FixedBatcher(2), resampled=True, epoch_samples=100)


def test_two_workers_read_every_good_sample_once_and_count_the_corrupt_one(shards):
    ds = ShardStream(expand_shard_spec(str(shards)), decode, collate, FixedBatcher(3), seed=0, num_workers=2,
                     shuffle_buffer=5)
    position = LoaderPosition(2)
    loader = iter(make_loader(ds, 2, position))
    seen = []
    while len(seen) < 39 - 3:  # first epoch: 39 good samples; partial batches carry over
        batch, state = next(loader)
        position.update(state)
        seen += labels_of([batch])
    assert len(set(seen)) == len(seen), "a sample was delivered twice within the epoch"
    assert CORRUPT not in seen
    assert position.bad_samples == 1
    assert set(seen) <= set(range(40)) - {CORRUPT}


def test_batches_carry_their_sample_keys(shards):
    ds = ShardStream(expand_shard_spec(str(shards)), decode, collate, FixedBatcher(4), shuffle_buffer=0, num_workers=0)
    batch, state = next(iter(make_loader(ds, 0, LoaderPosition(0))))
    assert state["keys"] == [f"{i:04d}" for i in batch.tolist()]


# ---------------------------------------------------------------- exact resume, every batcher

BATCHERS = {
    "fixed": lambda: FixedBatcher(4),
    "bucket": lambda: BucketBatcher(length, max_total=16, bounds=[2, 4], max_held=9),
    "packer": lambda: TokenPacker(length, max_tokens=16, open_packs=3),
}


def make_stream(kind, root, make_batcher, num_workers, seed=7):
    spec = str(root) if kind == "tar" else f"{root}/a.jsonl::{root}/b.jsonl"
    return ShardStream(expand_shard_spec(spec), decode, collate, make_batcher(), seed=seed, num_workers=num_workers,
                       shuffle_buffer=8)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batcher", list(BATCHERS))
@pytest.mark.parametrize("kind", ["tar", "jsonl"])
def test_killed_and_resumed_stream_gives_exactly_the_uninterrupted_samples(shards, manifest, kind, batcher,
                                                                           num_workers):
    """Stop after k batches (throwing the loader and what it prefetched away), resume from the saved state:
    the batches equal an uninterrupted run's. Same samples, same order, none lost, none repeated, over
    several epochs, for every cut point tried, with samples held in buckets or packs across the cut."""
    root = shards if kind == "tar" else manifest
    make_batcher = BATCHERS[batcher]
    n = 60
    full_position = LoaderPosition(num_workers)
    full = take_batches(make_stream(kind, root, make_batcher, num_workers), full_position, n, num_workers)
    assert take_batches(make_stream(kind, root, make_batcher, num_workers), LoaderPosition(num_workers), n, num_workers) == full
    held_at_cuts = 0
    for cut in (3, 7, 16):
        first = LoaderPosition(num_workers)
        part = take_batches(make_stream(kind, root, make_batcher, num_workers), first, cut, num_workers)
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation, as in a checkpoint
        held_at_cuts += sum(len(w["held"]) for w in state["workers"].values())
        resumed = LoaderPosition(num_workers, state)
        rest = take_batches(make_stream(kind, root, make_batcher, num_workers), resumed, n - cut, num_workers)
        assert part + rest == full, f"cut at {cut}"
        assert resumed.state_dict() == full_position.state_dict()  # positions, held keys and counts too
    if batcher != "fixed":  # a fixed batcher holds nothing once it has emitted
        assert held_at_cuts > 0, "no sample was held across a cut: the test did not test the resume rule"
    # over more than two epochs, every good sample comes, the corrupt one never, none far more often than others
    good = set(range(40 if kind == "tar" else 60)) - {CORRUPT}
    counts = Counter(labels_of(full))
    assert set(counts) == good
    assert sum(counts.values()) > 2 * len(good)
    assert max(counts.values()) - min(counts.values()) <= 2
    assert full_position.bad_samples >= 2  # the corrupt sample, counted once in each epoch that reached it


def test_resume_with_other_worker_count_is_refused(shards):
    pos = LoaderPosition(2)
    with pytest.raises(ValueError, match="num_workers=2"):
        LoaderPosition(3, pos.state_dict())


def test_too_few_shards_for_workers_is_a_clear_error(shards):
    with pytest.raises(ShardSpecError, match="4 shards for 2 ranks x 4 workers"):
        ShardStream(expand_shard_spec(str(shards)), decode, collate, FixedBatcher(2), world_size=2, num_workers=4)


# ---------------------------------------------------------------- JSONL manifests

def test_one_manifest_feeds_two_ranks_by_line_without_overlap(manifest):
    """A single JSONL file, 2 ranks x 2 workers: each slot reads every 4th line, together all of them."""
    sources = expand_shard_spec(str(manifest / "a.jsonl"))
    seen, bad = [], 0
    for rank in range(2):
        ds = ShardStream(sources, decode, collate, FixedBatcher(1), rank=rank, world_size=2, num_workers=2,
                         shuffle_buffer=0)
        for worker in range(2):
            stream = ds.worker_batches(worker)
            for _ in range(39 // 4 - 1):
                batch, state = next(stream)
                seen += batch.tolist()
                bad = max(bad, state["bad_samples"]) if CORRUPT % 4 == rank * 2 + worker else bad
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(40)) - {CORRUPT}
    assert len(seen) == 4 * (39 // 4 - 1)


def test_manifest_keys_and_root(manifest):
    counts = {"bad_shards": 0}
    [first, *_] = read_samples([str(manifest / "a.jsonl")], counts)
    assert first["__key__"] == "a:1" and first["__root__"] == str(manifest) and json.loads(first["json"]) == {"cls": 0}
    assert counts["bad_shards"] == 0


# ---------------------------------------------------------------- broken shards

def test_truncated_shard_is_skipped_and_counted(shards):
    data = (shards / "part-01.tar").read_bytes()
    (shards / "part-01.tar").write_bytes(data[: len(data) // 2 + 100])
    counts = {"bad_samples": 0, "bad_shards": 0}
    got = [int(s["cls"]) for s in read_samples([str(shards / f"part-0{i}.tar") for i in range(4)], counts)]
    assert counts["bad_shards"] == 1
    assert set(range(20, 40)) <= set(got) and set(range(0, 10)) <= set(got)


def _member_offsets(path):
    import tarfile
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["inside a header block", "at a header boundary", "garbled header"])
def test_shard_cut_inside_a_header_counts_as_bad(shards, cut):
    """tarfile ends quietly when a header block is short, missing or garbled: without our end-of-archive
    check, the rest of the shard would vanish with bad_shards still 0."""
    path = shards / "part-02.tar"
    data = path.read_bytes()
    offset = _member_offsets(path)[8]  # the header of the 5th of 10 samples (2 files each)
    broken = {"inside a header block": data[:offset + 200], "at a header boundary": data[:offset],
              "garbled header": data[:offset] + b"\x07" * 512 + data[offset + 512:]}[cut]
    path.write_bytes(broken)
    counts = {"bad_shards": 0}
    got = [int(s["cls"]) for s in read_samples([str(path)], counts)]
    assert counts["bad_shards"] == 1
    assert got == list(range(20, 24))  # the samples before the cut are kept


def test_pipe_url_is_read(shards):
    counts = {"bad_samples": 0, "bad_shards": 0}
    got = list(read_samples([f"pipe:cat {shards / 'part-02.tar'}"], counts))
    assert [int(s["cls"]) for s in got] == list(range(20, 30)) and counts["bad_shards"] == 0


def test_missing_remote_shard_counts_as_bad(shards):
    counts = {"bad_samples": 0, "bad_shards": 0}
    urls = [f"pipe:cat {shards}/does-not-exist.tar", str(shards / "part-00.tar")]
    got = list(read_samples(urls, counts))
    assert len(got) == 10 and counts["bad_shards"] == 1


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_batches_cover_everything_in_order_across_ranks(shards, world_size):
    got = []
    for rank in range(world_size):
        got += labels_of(iterate_eval_batches(str(shards / "part-{00..01}.tar"), decode, collate, 4, rank, world_size))
    assert sorted(got) == [i for i in range(20) if i != CORRUPT]
    if world_size == 1:
        assert got == [i for i in range(20) if i != CORRUPT]


def test_eval_batches_sorted_by_a_key_within_each_window(shards):
    """sort_key orders each run of sort_window x batch_size samples (here 2 x 3 = 6), then batches them: the same
    samples, each window's in key order."""
    spec = str(shards / "part-{00..01}.tar")
    key = lambda label: (length(label), label)  # noqa: E731
    batches = [b.tolist() for b in iterate_eval_batches(spec, decode, collate, 3, sort_key=key, sort_window=2)]
    labels = [i for i in range(20) if i != CORRUPT]
    windows = [labels[i:i + 6] for i in range(0, len(labels), 6)]
    want = [w for window in windows for w in sorted(window, key=key)]
    assert [x for b in batches for x in b] == want != labels
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 3, 1]  # the last window's 1 left over is a batch of its own


def test_http_shards_are_read_and_a_404_is_counted(shards):
    """Shards served over http:// (webdataset opens them with curl), one URL missing."""
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        [src] = expand_shard_spec(f"{base}/part-{{00..01}}.tar")
        counts = {"bad_samples": 0, "bad_shards": 0}
        got = [int(s["cls"]) for s in read_samples([*src.urls, f"{base}/missing.tar"], counts)]
    finally:
        server.shutdown()
    assert got == list(range(20)) and counts["bad_shards"] == 1
