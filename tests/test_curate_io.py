"""The curation tools' shared parts: Report counts, reading shards (bad ones counted, never fatal), ShardWriter's
atomic output, the output-folder guard, and run_chain re-runs replacing only their own files."""
from __future__ import annotations

import json

import pytest

from data_tools.curate.cli import OutputConfig, Step, run_chain
from data_tools.curate.io import (ShardWriter, decode_image, iter_samples, prepare_output, sample_audio_bytes,
                                  sample_image_bytes, sample_text)
from data_tools.curate.report import MAX_EXAMPLES, Report, format_funnel
from tests.curate_fixtures import (image_bytes, keys, noise_pairs, pair, read_output, read_report, speech,
                                   tone_flac, tree_digest, truncate, write_shards)


# ---------------------------------------------------------------- Report

def test_report_counts_add_up_and_keep_a_few_examples_per_reason(tmp_path):
    r = Report("filters")
    for i in range(12):
        r.seen()
        s = {"__key__": f"k{i}", "__url__": "a.tar"}
        if i < 4:
            r.keep(s)
        elif i < 11:
            r.drop(s, "min_side", detail=f"side {i}")
        else:
            r.corrupt("k11", ValueError("bad jpeg"))
    assert (r.n_in, r.n_out, r.drops) == (12, 4, {"min_side": 7, "corrupt": 1})
    r.check()
    d = r.to_dict()
    assert len(d["examples"]["min_side"]) == MAX_EXAMPLES
    assert d["examples"]["min_side"][0] == {"key": "k4", "url": "a.tar", "detail": "side 4"}
    assert d["examples"]["corrupt"][0]["detail"] == "ValueError: bad jpeg"
    r.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == d
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind
    assert Report.from_dict(d).to_dict() == d
    assert "min_side 7" in format_funnel([r])


def test_report_on_drop_gets_every_drop_and_the_report_counts_as_before():
    rows = []
    report = Report("odd", on_drop=rows.append)
    for i in range(12):
        report.seen()
        if i % 3 == 0:
            report.drop({"__key__": str(i), "__url__": "a.tar"}, "thirds", f"key {i}")
        else:
            report.keep()
    report.seen()
    report.corrupt("bad.tar", ValueError("truncated"))
    assert [r["key"] for r in rows] == ["0", "3", "6", "9", "bad.tar"]  # all of them, not MAX_EXAMPLES
    assert rows[1] == {"step": "odd", "key": "3", "url": "a.tar", "reason": "thirds", "detail": "key 3"}
    assert rows[4]["reason"] == "corrupt" and rows[4]["detail"] == "ValueError: truncated"
    report.check()
    assert report.drops == {"thirds": 4, "corrupt": 1} and report.n_out == 8


def test_report_check_catches_a_sample_neither_kept_nor_dropped():
    r = Report("x")
    r.seen(2)
    r.keep()
    with pytest.raises(AssertionError, match="2 in != 1 out"):
        r.check()
    with pytest.raises(ValueError, match="reason code"):
        r.drop({"__key__": "a"}, "")


# ---------------------------------------------------------------- reading

def test_iter_samples_reads_every_shard_and_counts_a_truncated_one(tmp_path):
    write_shards(tmp_path / "in", noise_pairs(30), per_shard=10)
    truncate(tmp_path / "in" / "shard-000001.tar")
    r = Report("read")
    got = list(iter_samples(str(tmp_path / "in"), r))
    assert keys(got)[:10] == [f"{i:06d}" for i in range(10)] and keys(got)[-10:] == [f"{i:06d}" for i in range(20, 30)]
    assert 10 < len(got) < 30  # some of the truncated shard's samples came through, the rest is lost
    assert r.drops == {"corrupt": 1} and r.n_out == len(got)
    r.check()
    assert "shard-000001.tar" in r.to_dict()["examples"]["corrupt"][0]["key"]


def test_iter_samples_refuses_manifests_and_missing_shards(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match="not JSONL manifests"):
        list(iter_samples(str(tmp_path / "m.jsonl"), Report("read")))
    with pytest.raises(ValueError, match="missing"):
        list(iter_samples(str(tmp_path / "nope-{000..002}.tar"), Report("read")))


def test_field_helpers():
    s = pair("a", image_bytes(size=(20, 10)), "a red square")
    assert sample_text(s) == "a red square"
    assert sample_image_bytes(s)[0] == "png" and decode_image(s).size == (20, 10)
    a = speech("b", tone_flac(0.1), "hello there")
    assert sample_text(a) == "hello there" and sample_audio_bytes(a)[0] == "flac" and sample_image_bytes(a) is None
    assert sample_text({"__key__": "c", "json": b'{"caption": "from json"}'}) == "from json"
    assert sample_text({"__key__": "d", "jpg": b"x"}) is None
    with pytest.raises(ValueError, match="not UTF-8"):
        sample_text({"__key__": "e", "txt": b"\xff\xfe"})
    with pytest.raises(ValueError, match="not valid JSON"):
        sample_text({"__key__": "f", "json": b"{"})
    with pytest.raises(ValueError, match="could not decode|not an image"):
        decode_image({"__key__": "g", "jpg": image_bytes(fmt="JPEG")[:60]})
    with pytest.raises(ValueError, match="no image field"):
        decode_image({"__key__": "h", "txt": b"x"})


# ---------------------------------------------------------------- writing

def test_shard_writer_splits_by_count_and_bytes_and_copies_fields_exactly(tmp_path):
    samples = noise_pairs(7)
    samples[3]["weird.json.gz"] = b"not gzip at all"  # written as it is, not compressed again
    with ShardWriter(tmp_path / "out", max_count=3) as w:
        for s in samples:
            w.write(s)
        assert not any(p.exists() for p in w.paths)  # only temps until the writer closes
    assert [p.name for p in w.paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_output(tmp_path / "out") == samples
    size = len(samples[0]["png"]) + len(samples[0]["txt"])
    with ShardWriter(tmp_path / "bytes", max_bytes=2.5 * size) as w:
        for s in samples[:6]:
            w.write(s)
    assert len(w.paths) == 2  # 3 samples pass 2.5 samples' bytes


def test_shard_writer_leaves_nothing_on_an_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, max_count=2) as w:
            for s in noise_pairs(5):
                w.write(s)
            raise RuntimeError("a step failed")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- the output folder

def copy_step(samples, cfg, report):
    for s in samples:
        report.seen()
        report.keep(s)
        yield s


def test_output_folder_refusals(tmp_path):
    write_shards(tmp_path / "in", noise_pairs(4))
    spec = str(tmp_path / "in" / "shard-000000.tar")
    with pytest.raises(ValueError, match="holds input shard"):
        prepare_output(tmp_path / "in", spec)
    with pytest.raises(ValueError, match="holds input shard"):
        prepare_output(tmp_path, spec)  # the input is inside it
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="no curation run wrote.*--overwrite"):
        prepare_output(tmp_path / "theirs", spec)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a report.json a curation run wrote"):
        prepare_output(tmp_path / "bad", spec)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "precious"
    assert prepare_output(tmp_path / "theirs", spec, overwrite=True) == []  # allowed, nothing of ours to replace
    assert prepare_output(tmp_path / "new" / "deeper", spec) == [] and (tmp_path / "new" / "deeper").is_dir()


def test_rerun_replaces_only_its_own_shards_and_never_changes_the_input(tmp_path):
    write_shards(tmp_path / "in", noise_pairs(25))
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out"
    first = run_chain(str(tmp_path / "in"), OutputConfig(str(out), shard_max_count=5),
                      [Step("copy", copy_step, None)], tool="copy")
    assert first["files"] == [f"shard-{i:06d}.tar" for i in range(5)] and first["n_out"] == 25
    second = run_chain(str(tmp_path / "in"), OutputConfig(str(out), shard_max_count=10),
                       [Step("copy", copy_step, None)], tool="copy")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", *second["files"]]  # shards 3 and 4 removed
    assert len(second["files"]) == 3 and len(read_output(out)) == 25
    (out / "mine.tar").write_bytes(b"a user's file")
    with pytest.raises(ValueError, match="no curation run wrote"):
        run_chain(str(tmp_path / "in"), OutputConfig(str(out)), [Step("copy", copy_step, None)], tool="copy")
    assert (out / "mine.tar").exists() and read_report(out)["files"] == second["files"]
    run_chain(str(tmp_path / "in"), OutputConfig(str(out), overwrite=True), [Step("copy", copy_step, None)],
              tool="copy")
    assert not (out / "mine.tar").exists()  # overwrite replaces foreign shards: a loader would read them
    assert tree_digest(tmp_path / "in") == before


def test_pipe_specs_are_read_and_a_killed_runs_leftovers_are_ours(tmp_path):
    write_shards(tmp_path / "in", noise_pairs(12), per_shard=6)
    spec = f"pipe:cat {tmp_path}/in/shard-000000.tar::{tmp_path}/in/shard-000001.tar"
    assert len(list(iter_samples(spec, Report("read")))) == 12
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-000000.tar.4242.tmp").write_bytes(b"half a shard")  # what a SIGKILL leaves
    (out / ".tmp-curate-abc123").mkdir()
    assert sorted(prepare_output(out, spec)) == [".shard-000000.tar.4242.tmp", ".tmp-curate-abc123"]
    run_chain(spec, OutputConfig(str(out)), [Step("copy", copy_step, None)], tool="copy")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "shard-000000.tar"]


def test_shard_writer_never_puts_two_samples_with_one_key_side_by_side(tmp_path):
    """Sources numbered alike can meet with equal keys at a shard boundary ('a'...'000009' then '000009'...):
    side by side in one tar, a reader would merge them into one broken sample. A new shard starts instead."""
    a, b, c = noise_pairs(3)
    samples = [a, {**b, "__key__": a["__key__"]}, c]
    with ShardWriter(tmp_path / "out", max_count=10) as w:
        for s in samples:
            w.write(s)
    assert read_output(tmp_path / "out") == samples and len(w.paths) == 2
