"""The tools' command lines: --help from the config's field comments, bad keys and values refused with what is
accepted, bad inputs and output folders refused with exit status 2, and a run that writes shards and a report."""
from __future__ import annotations

import subprocess
import sys

import pytest

from data_tools.curate import dedup, filters, reshard
from tests.curate_fixtures import (image_bytes, keys, noise_pairs, pair, read_output, read_report, tree_digest,
                                   write_shards)
from tests.helpers import ROOT, SUBPROCESS_ENV


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.fixture
def shards(tmp_path):
    samples = noise_pairs(6) + [pair("small", image_bytes(size=(10, 10)), "a small one")]
    write_shards(tmp_path / "in", samples, per_shard=4)
    return tmp_path / "in"


def test_help_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "data_tools.curate.dedup", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**SUBPROCESS_ENV, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--near_bits=8  (int)  Hamming distance (of 64 bits)" in proc.stdout and "--output=''" in proc.stdout


def test_pipeline_help(capsys):
    from data_tools.curate.__main__ import main

    assert main(["--help"]) == 0
    assert "Steps: dedup, filters, clip_score, semdedup, balance, reshard" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize("main,words", [(filters.main, "--min_side=None  (int | None)  drop images whose shorter"),
                                        (reshard.main, "--n_shards=None"), (dedup.main, "--color_tolerance=5.0")])
def test_help_lists_every_key_with_its_comment(main, words, capsys):
    assert exit_code(main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert words in out and "--shard_max_count=10000" in out and "Usage: python -m data_tools.curate." in out
    assert exit_code(main, []) == 2  # no arguments: the usage, and a failure status


@pytest.mark.parametrize("args,message", [
    (["--min_sid=200"], "unknown config key 'min_sid' for FiltersConfig. Did you mean: min_side"),
    (["--min_side=big"], "--min_side: 'big' is not a int"),
    (["--languages=english"], "unknown language code 'english'"),
    (["--blocklist_regex=(x"], "not a regular expression"),
])
def test_bad_keys_and_values_fail_with_a_message(tmp_path, shards, capsys, args, message):
    assert exit_code(filters.main, [str(shards), f"--output={tmp_path / 'out'}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_bad_inputs_and_output_folders_fail_with_a_message(tmp_path, shards, capsys):
    before = tree_digest(shards)
    cases = [([f"{tmp_path}/nothing-{{000..003}}.tar", f"--output={tmp_path / 'o'}"], "missing or empty"),
             ([str(shards)], "--output=DIR is required"),
             ([f"--output={tmp_path / 'o'}"], "no INPUT"),
             ([str(shards), f"--output={shards}"], "holds input shard"),
             ([str(shards), f"--output={tmp_path}"], "holds input shard")]
    for argv, message in cases:
        assert exit_code(dedup.main, argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert tree_digest(shards) == before


def test_a_tool_run_writes_shards_and_a_report(tmp_path, shards, capsys):
    assert exit_code(filters.main, [str(shards), "--output", str(tmp_path / "out"), "--min_side=16",
                                    "--shard_max_count=4"]) == 0
    assert keys(read_output(tmp_path / "out")) == [f"{i:06d}" for i in range(6)]
    report = read_report(tmp_path / "out")
    assert report["files"] == ["shard-000000.tar", "shard-000001.tar"] and report["tool"] == "filters"
    assert report["config"]["filters"]["min_side"] == 16
    assert report["steps"][1]["drops"] == {"min_side": 1}
    assert report["steps"][1]["examples"]["min_side"][0]["detail"] == "10x10: shorter side 10 < 16"
    out = capsys.readouterr().out
    assert "min_side 1" in out and "wrote 6 of 7 samples in 2 shards" in out
