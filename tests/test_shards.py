"""The WebDataset stages: spec expansion, worker splitting, corrupt samples, determinism, exact resume."""
import json
from collections import Counter

import pytest
import torch

from mm.shards import (LoaderPosition, ShardSpecError, ShardStream, expand_shard_spec, iterate_eval_batches,
                       list_epoch_shards, make_loader, read_tar_samples)
from tests.helpers import png_bytes, write_tar


def decode(sample):
    from PIL import Image
    import io
    Image.open(io.BytesIO(sample["png"])).load()  # raises on corrupt bytes
    return int(sample["cls"])


def collate(items):
    return torch.tensor(items)


@pytest.fixture()
def shards(tmp_path):
    """4 shards x 10 samples labelled 0..39; sample 13 has corrupt image bytes."""
    for s in range(4):
        samples = []
        for i in range(s * 10, s * 10 + 10):
            img = b"\x89PNG this is not a png" if i == 13 else png_bytes((i, 0, 0))
            samples.append({"__key__": f"{i:04d}", "png": img, "cls": str(i)})
        write_tar(tmp_path / f"part-{s:02d}.tar", samples)
    return tmp_path


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
    slots = [list(list_epoch_shards([src], seed=1, epoch=0, slot=s, n_slots=4, resampled=False)) for s in range(4)]
    assert sorted(u for s in slots for u in s) == sorted(src.urls)
    assert all(len(s) == 1 for s in slots)
    again = [list(list_epoch_shards([src], seed=1, epoch=1, slot=s, n_slots=4, resampled=False)) for s in range(4)]
    assert again != slots  # a new epoch deals shards differently


def test_resampled_draws_follow_weights(shards):
    a, b = expand_shard_spec(f"{shards}/part-00.tar::{shards}/part-01.tar", weights=[3, 1])
    stream = list_epoch_shards([a, b], seed=0, epoch=0, slot=0, n_slots=1, resampled=True)
    counts = Counter(next(stream).split("/")[-1] for _ in range(4000))
    assert 0.7 < counts["part-00.tar"] / 4000 < 0.8


def test_two_workers_read_every_good_sample_once_and_count_the_corrupt_one(shards):
    ds = ShardStream(expand_shard_spec(str(shards)), decode, collate, batch_size=3, seed=0, num_workers=2,
                     shuffle_buffer=5, epoch_samples=None)
    position = LoaderPosition(2)
    loader = iter(make_loader(ds, 2, position))
    seen = []
    while len(seen) < 39 - 3:  # first epoch: 39 good samples; partial batches carry over
        batch, state = next(loader)
        position.update(state)
        seen += labels_of([batch])
    assert len(set(seen)) == len(seen), "a sample was delivered twice within the epoch"
    assert 13 not in seen
    assert position.bad_samples == 1
    assert set(seen) <= set(range(40)) - {13}


def _take(ds, position, n_batches, num_workers):
    loader = iter(make_loader(ds, num_workers, position))
    out = []
    for _ in range(n_batches):
        batch, state = next(loader)
        position.update(state)
        out.append(batch.tolist())
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_same_stream_and_exact_resume(shards, num_workers):
    def make(resume=None):
        return ShardStream(expand_shard_spec(str(shards)), decode, collate, batch_size=4, seed=7,
                           num_workers=num_workers, shuffle_buffer=8)
    full = _take(make(), LoaderPosition(num_workers), 25, num_workers)  # > 2 epochs
    assert _take(make(), LoaderPosition(num_workers), 25, num_workers) == full  # deterministic
    first = LoaderPosition(num_workers)
    part = _take(make(), first, 7, num_workers)  # 7 batches: odd, so the resumed round-robin must rotate
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation, as in a checkpoint
    rest = _take(make(), LoaderPosition(num_workers, state), 18, num_workers)
    assert part + rest == full
    assert first.bad_samples == 1 or num_workers == 2  # with 2 workers the corrupt one may be in the other's slice


def test_resume_with_other_worker_count_is_refused(shards):
    pos = LoaderPosition(2)
    with pytest.raises(ValueError, match="num_workers=2"):
        LoaderPosition(3, pos.state_dict())


def test_too_few_shards_for_workers_is_a_clear_error(shards):
    with pytest.raises(ShardSpecError, match="4 shards for 2 ranks x 4 workers"):
        ShardStream(expand_shard_spec(str(shards)), decode, collate, 2, world_size=2, num_workers=4)


def test_truncated_shard_is_skipped_and_counted(shards, tmp_path):
    data = (shards / "part-01.tar").read_bytes()
    (shards / "part-01.tar").write_bytes(data[: len(data) // 2 + 100])
    counts = {"bad_samples": 0, "bad_shards": 0}
    got = [int(s["cls"]) for s in read_tar_samples([str(shards / f"part-0{i}.tar") for i in range(4)], counts)]
    assert counts["bad_shards"] == 1
    assert set(range(20, 40)) <= set(got) and set(range(0, 10)) <= set(got)


def test_pipe_url_is_read(shards):
    counts = {"bad_samples": 0, "bad_shards": 0}
    got = list(read_tar_samples([f"pipe:cat {shards / 'part-02.tar'}"], counts))
    assert [int(s["cls"]) for s in got] == list(range(20, 30)) and counts["bad_shards"] == 0


def test_missing_remote_shard_counts_as_bad(shards):
    counts = {"bad_samples": 0, "bad_shards": 0}
    urls = [f"pipe:cat {shards}/does-not-exist.tar", str(shards / "part-00.tar")]
    got = list(read_tar_samples(urls, counts))
    assert len(got) == 10 and counts["bad_shards"] == 1


def test_eval_batches_cover_everything_in_order(shards):
    batches = list(iterate_eval_batches(str(shards / "part-{00..01}.tar"), decode, collate, batch_size=8))
    assert labels_of(batches) == [i for i in range(20) if i != 13]


def test_http_shards_are_read_and_a_404_is_counted(shards):
    """Shards served over http:// (webdataset opens them with curl), one URL missing."""
    import functools
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
        got = [int(s["cls"]) for s in read_tar_samples([*src.urls, f"{base}/missing.tar"], counts)]
    finally:
        server.shutdown()
    assert got == list(range(20)) and counts["bad_shards"] == 1
