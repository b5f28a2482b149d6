"""benchmarks/curation_gain.py: the scoring against truth.jsonl on crafted drops (numbers that must hold), the drops
recorded, and the whole benchmark at a tiny size (300 samples, 3 steps of the tiny recipe preset)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from benchmarks.curation_gain import (check_counts, kept_ref, main, resolve_pipeline, score_dedup,
                                      score_rule, score_steps)


def line(key, kind, original=None):
    return {"key": key, "kind": kind, "original": original}


# a+b, c+d, f+g are injected groups {original, copy}; e is clean and alone, h swapped, t tiny, x extreme_aspect
TRUTH = {t["key"]: t for t in [line("a", "clean"), line("b", "near_dup", "a"), line("c", "clean"),
                               line("d", "near_dup", "c"), line("e", "clean"), line("f", "clean"),
                               line("g", "near_dup", "f"), line("h", "swapped"), line("t", "tiny"),
                               line("x", "extreme_aspect")]}


def drop(step, key, reason, detail=""):
    return {"step": step, "key": key, "reason": reason, "detail": detail}


def test_kept_ref_reads_both_dedup_details():
    assert kept_ref("same image as 00000042 (shard-000001.tar)") == "00000042"
    assert kept_ref("7 bits and colour 1.3 from 00000007 (shard-000003.tar)") == "00000007"
    assert kept_ref("3 bits from k9") == "k9"
    with pytest.raises(ValueError, match="format changed"):
        kept_ref("near something")


def test_dedup_drop_counts_only_when_it_repeats_its_own_group():
    drops = [drop("dedup", "b", "near_image", "2 bits and colour 1.0 from a (s0.tar)"),  # copy of its original
             drop("dedup", "c", "exact_image", "same image as d (s1.tar)"),  # an original after its copy: right
             drop("dedup", "e", "near_image", "4 bits and colour 2.0 from a (s0.tar)"),  # e is in no group
             drop("dedup", "g", "near_image", "9 bits and colour 2.4 from h (s2.tar)"),  # a copy, but matched to h
             drop("dedup", "shard-9.tar", "corrupt", "shard could not be opened")]  # not a duplicate claim
    s = score_dedup(drops, TRUTH)
    assert (s["dropped"], s["correct"], s["targets"]) == (4, 2, 3)
    assert s["precision"] == 0.5 and s["recall"] == round(2 / 3, 4)
    assert s["by_reason"] == {"near_image": 3, "exact_image": 1}
    assert score_dedup([], TRUTH)["precision"] is None  # nothing dropped: no precision, not a perfect one


def test_rule_recall_is_over_the_targets_that_reached_the_step():
    entered = set(TRUTH) - {"x"}  # x was dropped by an earlier step
    s = score_rule([drop("filters", "t", "min_side"), drop("filters", "a", "min_side")], entered, TRUTH,
                   ("tiny", "extreme_aspect"))
    assert (s["dropped"], s["correct"], s["targets"]) == (2, 1, 1)
    assert (s["precision"], s["recall"], s["recall_of_all_injected"]) == (0.5, 1.0, 0.5)


def test_steps_are_scored_on_what_reached_them():
    drops = [drop("dedup", "x", "near_image", "5 bits and colour 2.0 from e (s.tar)"),
             drop("filters", "t", "min_side"), drop("clip_score", "h", "low_clip_score"),
             drop("clip_score", "e", "low_clip_score"), drop("reshard", "q", "never")]
    s = score_steps(["dedup", "filters", "clip_score", "reshard"], drops, TRUTH)
    assert s["dedup"]["precision"] == 0.0 and s["dedup"]["recall"] == 0.0
    assert s["filters"]["targets"] == 1 and s["filters"]["recall"] == 1.0  # x never reached filters
    assert s["filters"]["recall_of_all_injected"] == 0.5
    assert (s["clip_score"]["precision"], s["clip_score"]["recall"]) == (0.5, 1.0)
    assert s["reshard"] == {"dropped": 1}


def test_check_counts_refuses_numbers_that_do_not_add_up():
    truth = {k: TRUTH[k] for k in "abc"}
    drops = [drop("dedup", "b", "near_image", "from a")]
    check_counts({"n_in": 3, "n_out": 2}, drops, truth, ["a", "c"])
    with pytest.raises(RuntimeError, match="expected 2"):
        check_counts({"n_in": 3, "n_out": 2}, drops, truth, ["a", "b"])
    with pytest.raises(RuntimeError, match="read 4 samples"):
        check_counts({"n_in": 4, "n_out": 2}, drops, truth, ["a", "c"])


def test_resolved_pipeline_points_at_this_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": "x", "output": "y", "steps": [
        {"name": "dedup"}, {"name": "clip_score", "checkpoint": "nowhere", "top_percent": 50}]}))
    data = yaml.safe_load(resolve_pipeline(config, tmp_path / "in", tmp_path / "out", tmp_path / "run",
                                           tmp_path / "r.yaml").read_text())
    assert (data["input"], data["output"]) == (str(tmp_path / "in"), str(tmp_path / "out"))
    assert data["steps"][1] == {"name": "clip_score", "checkpoint": str(tmp_path / "run"), "top_percent": 50}
    data = yaml.safe_load(resolve_pipeline(config, tmp_path / "in", tmp_path / "out", None,
                                           tmp_path / "r.yaml").read_text())
    assert data["steps"][1]["enabled"] is False  # no model to score with: the step is left out


def test_bad_settings_fail_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="no such pipeline file"):
        main([f"--workdir={tmp_path / 'w'}", "--config=nowhere.yaml"])
    with pytest.raises(SystemExit, match="Did you mean: max_steps"):
        main([f"--workdir={tmp_path / 'w'}", "--max_step=3"])
    assert not (tmp_path / "w").exists()


def test_tiny_benchmark_end_to_end(tmp_path):
    work = tmp_path / "work"
    result = main([f"--workdir={work}", "--n=300", "--per_shard=100", "--max_steps=3", "--recipe_preset=tiny",
                   "--val=8", "--zeroshot_per_class=1"])
    assert json.loads((work / "results.json").read_text()) == json.loads(json.dumps(result))
    assert set(result) >= {"command", "machine", "settings", "zeroshot_top1", "samples", "kinds", "funnel", "steps",
                           "goals", "wall_s"}
    assert all(0 <= result["zeroshot_top1"][run] <= 1 for run in ("noisy", "curated"))
    assert set(result["goals"]) == {"curated_beats_noisy", "dedup_recall_0.95_at_precision_0.95"}

    funnel = result["funnel"]
    assert [f["step"] for f in funnel] == ["read", "dedup", "filters", "clip_score", "reshard"]
    for before, after in zip(funnel, funnel[1:]):
        assert after["n_in"] == before["n_out"] and after["n_in"] == after["n_out"] + sum(after["drops"].values())
    drops = [json.loads(x) for x in (work / "drops.jsonl").read_text().splitlines()]
    assert result["samples"] == {"noisy": 300, "curated": 300 - len(drops)} and funnel[-1]["n_out"] == 300 - len(drops)
    assert sum(result["kinds"]["noisy"].values()) == 300
    assert sum(result["kinds"]["curated"].values()) == result["samples"]["curated"]

    steps = result["steps"]
    for name in ("dedup", "filters", "clip_score"):
        assert steps[name]["dropped"] == sum(funnel[[f["step"] for f in funnel].index(name)]["drops"].values())
    assert steps["dedup"]["targets"] == result["kinds"]["noisy"]["near_dup"] == 60
    assert steps["dedup"]["precision"] >= 0.9 and steps["dedup"]["recall"] >= 0.9  # the tuned config, even at 300
    assert steps["filters"]["precision"] == steps["filters"]["recall"] == 1.0  # the thresholds split them exactly
    assert result["kinds"]["curated"]["tiny"] == result["kinds"]["curated"]["extreme_aspect"] == 0
    clip_in = funnel[3]["n_in"]
    assert funnel[3]["n_out"] == math.ceil(clip_in * 0.6)  # top_percent 60 of benchmarks/curation_gain.yaml

    resolved = yaml.safe_load((work / "curate.yaml").read_text())
    assert resolved["steps"][2]["checkpoint"] == str(work / "runs" / "noisy")  # scored by the noisy run
    for run in ("noisy", "curated"):
        assert json.loads((work / "runs" / run / "results.json").read_text())["step"] == 3
    assert sorted(p.name for p in (work / "curated").glob("*.tar")) == ["shard-000000.tar"]

    # benchmarks/dedup_sweep.py's replay of the dedup rule (how the yaml's settings were chosen) drops the same
    from benchmarks.dedup_sweep import fingerprints, replay_dedup
    dedup = resolved["steps"][0]
    replayed = replay_dedup(*fingerprints(work / "data" / "train")[:3], dedup["near_bits"], dedup["color_tolerance"])
    assert [(d["key"], kept_ref(d["detail"])) for d in replayed] == \
        [(d["key"], kept_ref(d["detail"])) for d in drops if d["step"] == "dedup"]
