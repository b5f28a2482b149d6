"""Reshard: target count or size, a global shuffle that is a permutation, seeded and repeatable byte for byte,
merged with draws proportional to what each run has left, in rounds with bounded open runs."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from data_tools.curate import reshard
from data_tools.curate.io import iter_samples
from data_tools.curate.report import Report
from data_tools.curate.reshard import ReshardConfig, Run, interleave, shard_sizes, write_run
from tests.curate_fixtures import keys, noise_pairs, read_output, read_report, tree_digest, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("reshard_in")
    samples = noise_pairs(53, size=8)
    write_shards(folder, samples, per_shard=20)
    return folder, samples


def run_tool(tmp_path, input_dir, name, *args) -> Path:
    out = tmp_path / name
    with pytest.raises(SystemExit) as e:
        reshard.main([str(input_dir), f"--output={out}", *args])
    assert e.value.code == 0
    return out


def shard_digests(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))]


def test_n_shards_spreads_a_global_shuffle_evenly(tmp_path, shards):
    folder, samples = shards
    before = tree_digest(folder)
    out = run_tool(tmp_path, folder, "a", "--n_shards=4", "--seed=1")
    assert [len(read_output(p)) for p in sorted(out.glob("*.tar"))] == [14, 13, 13, 13]
    got = read_output(out)
    assert sorted(keys(got)) == keys(samples) and keys(got) != keys(samples)  # all, once each, in a new order
    by_key = {s["__key__"]: s for s in samples}
    assert all(s == by_key[s["__key__"]] for s in got)  # byte-identical fields
    first_shard = keys(read_output(sorted(out.glob("*.tar"))[0]))
    assert max(int(k) for k in first_shard) >= 40  # the first output shard draws from the last input shard too
    report = read_report(out)
    assert [(s["step"], s["n_in"], s["n_out"]) for s in report["steps"]] == [("read", 53, 53), ("reshard", 53, 53)]
    assert tree_digest(folder) == before


def test_same_seed_same_bytes_other_seed_other_order(tmp_path, shards):
    folder, _ = shards
    a = run_tool(tmp_path, folder, "a", "--max_count=10", "--seed=7")
    b = run_tool(tmp_path, folder, "b", "--max_count=10", "--seed=7", "--memory_mb=0.005", "--max_open=2")
    c = run_tool(tmp_path, folder, "c", "--max_count=10", "--seed=8")
    assert len(shard_digests(a)) == 6  # 53 samples, 10 a shard
    assert shard_digests(a) == run_and_digest(tmp_path, folder, "a2", "--max_count=10", "--seed=7")
    assert shard_digests(b) == run_and_digest(tmp_path, folder, "b2", "--max_count=10", "--seed=7",
                                              "--memory_mb=0.005", "--max_open=2")
    assert keys(read_output(a)) != keys(read_output(c))
    assert sorted(keys(read_output(b))) == sorted(keys(read_output(a)))


def run_and_digest(tmp_path, folder, name, *args) -> list[str]:
    return shard_digests(run_tool(tmp_path, folder, name, *args))


def test_spilled_runs_merge_in_rounds_with_bounded_open_runs(tmp_path, shards, monkeypatch):
    folder, samples = shards
    open_now, most_open, merges = [0], [0], []
    real_read_run, real_merge = reshard.read_run, reshard._merge_to_disk

    def counting_read_run(run):
        open_now[0] += 1
        most_open[0] = max(most_open[0], open_now[0])
        try:
            yield from real_read_run(run)
        finally:
            open_now[0] -= 1

    def counting_merge(group, *args):
        merges.append(len(group))
        return real_merge(group, *args)

    monkeypatch.setattr(reshard, "read_run", counting_read_run)
    monkeypatch.setattr(reshard, "_merge_to_disk", counting_merge)
    # ~130 bytes a sample: runs of 2-3 samples, ~20 runs, merged 3 at a time in three rounds
    cfg = ReshardConfig(memory_mb=0.0003, max_open=3, seed=3, tmp_dir=str(tmp_path))
    report = Report("reshard")
    got = list(reshard.apply(iter_samples(str(folder), Report("read")), cfg, report))
    assert sorted(keys(got)) == keys(samples) and keys(got) != keys(samples)
    assert most_open[0] <= 3 and len(merges) >= 4 and max(merges) <= 3
    assert list(tmp_path.iterdir()) == []  # the runs are gone
    report.check()


def test_merge_draws_in_proportion_to_what_each_run_has_left(tmp_path):
    """A run of 1 and a run of 9: the lone sample comes first 1 time in 10 (drawing runs evenly: 1 in 2)."""
    samples = noise_pairs(10, size=8)
    small, big = write_run(samples[:1], tmp_path / "a.tar"), write_run(samples[1:], tmp_path / "b.tar")
    firsts = [next(interleave([Run(small.path, 1), Run(big.path, 9)], random.Random(seed), True))["__key__"]
              for seed in range(300)]
    assert 15 <= firsts.count(samples[0]["__key__"]) <= 50  # expected 30


def test_no_shuffle_keeps_the_input_order(tmp_path, shards):
    folder, samples = shards
    out = run_tool(tmp_path, folder, "a", "--shuffle=false", "--max_count=25", "--memory_mb=0.004")
    assert keys(read_output(out)) == keys(samples)


def test_shard_sizes_and_config_errors():
    assert shard_sizes(53, 4) == [14, 13, 13, 13] and shard_sizes(3, 5) == [1, 1, 1] and shard_sizes(0, 2) == []
    for cfg, message in [({"max_count": 5, "n_shards": 2}, "not both"), ({"n_shards": 0}, "at least 1"),
                         ({"max_open": 1}, "at least 2")]:
        with pytest.raises(ValueError, match=message):
            list(reshard.apply([], ReshardConfig(**cfg), Report("r")))


def test_sources_with_the_same_keys_reshard_into_readable_shards(tmp_path):
    """Two sources numbered alike (both 000000...): the shuffle puts equal keys side by side now and then, and a
    reader merges neighbours with one key into one sample (webdataset fails on the duplicate fields, losing the
    rest of the shard). No two neighbours in a run or an output shard may share a key."""
    write_shards(tmp_path / "a", noise_pairs(150, seed=1, size=8), per_shard=50)
    write_shards(tmp_path / "b", noise_pairs(150, seed=2, size=8), per_shard=50)
    spec = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    for name, extra in (("mem", []), ("spilled", ["--memory_mb=0.003", "--max_open=3"])):
        for seed in range(3):
            out = run_tool(tmp_path, spec, f"{name}{seed}", "--n_shards=3", f"--seed={seed}", *extra)
            got = read_output(out)  # asserts no shard is unreadable
            assert len(got) == 300 and [len(read_output(p)) for p in sorted(out.glob("*.tar"))] == [100] * 3
            assert sorted(s["png"] for s in got) == sorted(s["png"] for s in read_output(tmp_path / "a")
                                                           + read_output(tmp_path / "b"))


def test_separate_equal_keys_moves_a_repeat_a_few_places_and_loses_nothing(caplog):
    def named(*ks):
        return [{"__key__": k, "i": str(i).encode()} for i, k in enumerate(ks)]

    for ks in (["a", "a", "b"], ["a", "b", "b"], ["x", "y", "a", "a"], ["a", "b", "c", "a", "a"], list("abcdd"),
               ["a", "a", "a", "b", "b", "b", "c"]):
        got = list(reshard.separate_equal_keys(named(*ks), delay=2))
        assert sorted(s["i"] for s in got) == sorted(s["i"] for s in named(*ks))
        assert all(p["__key__"] != q["__key__"] for p, q in zip(got, got[1:])), [s["__key__"] for s in got]
    assert [s["__key__"] for s in reshard.separate_equal_keys(named(*"abcd"))] == list("abcd")  # order kept
    # one key flooding the stream: every sample still comes out once, while at most `delay` wait for a gap
    flood = named(*["k"] * 200, "z")
    with caplog.at_level("WARNING", logger=reshard.log.name):
        assert sorted(s["i"] for s in reshard.separate_equal_keys(flood, delay=2)) == sorted(s["i"] for s in flood)
    assert len(caplog.records) == 1 and "sample(s) follow one with the same key" in caplog.text  # one line, counted
