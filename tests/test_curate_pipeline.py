"""The pipeline: YAML checked before any data is read, steps chained in one pass, funnel counts that add up,
corrupt samples and truncated shards reported (not fatal), the input untouched, and the example config runs."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from data_tools.curate import pipeline
from data_tools.curate.__main__ import main
from data_tools.curate.pipeline import load_pipeline, run_pipeline
from tests.curate_fixtures import (encode, image_bytes, keys, noise_image, noise_png, pair, read_output, read_report,
                                   tree_digest, truncate, write_shards)

EXAMPLE = Path(__file__).resolve().parents[1] / "data_tools" / "curate" / "examples" / "curate.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def noisy(tmp_path) -> Path:
    """30 samples in 3 shards: 4 exact and 3 near image copies, 5 one-word captions, 3 tiny images, 1 corrupt
    image, and a fourth shard cut short."""
    samples = []
    for i in range(30):
        image, caption = noise_png(i), f"a picture of thing {i}"
        if i in (3, 7, 11, 15):
            image = samples[i - 1]["png"]  # exact copy of the previous image
        if i in (20, 21, 22):
            image = encode(noise_image(i - 3), size=(48, 48))  # a near copy of sample i-3, resized
        if i in (5, 9, 13, 17, 25):
            caption = "thing"
        if i in (26, 27, 28):  # flat images share a pHash: colours far apart, so the colour check keeps them apart
            image = image_bytes(size=(8, 8), colour={26: (250, 0, 0), 27: (0, 250, 0), 28: (0, 0, 250)}[i])
        if i == 29:
            image = image[:40]
        samples.append(pair(f"{i:04d}", image, caption))
    write_shards(tmp_path / "in", samples, per_shard=10)
    write_shards(tmp_path / "more", [pair(f"x{i}", noise_png(100 + i), "one more thing here") for i in range(10)])
    (tmp_path / "more" / "shard-000000.tar").rename(tmp_path / "in" / "shard-000003.tar")
    truncate(tmp_path / "in" / "shard-000003.tar")
    return tmp_path / "in"


def steps_config(out: Path, input_dir: Path, **extra) -> dict:
    return {"input": str(input_dir), "output": str(out), "shard_max_count": 7, **extra, "steps": [
        {"name": "dedup", "near_bits": 8},
        {"name": "filters", "min_words": 2, "min_side": 16},
        {"name": "clip_score", "enabled": False, "checkpoint": "runs/clip", "not_checked": 1},
        {"name": "reshard", "n_shards": 3, "seed": 1},
    ]}


def test_funnel_counts_add_up(tmp_path, noisy, capsys):
    before = tree_digest(noisy)
    cfg = write_yaml(tmp_path / "c.yaml", steps_config(tmp_path / "out", noisy))
    assert main([str(cfg)]) == 0
    report = read_report(tmp_path / "out")
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["read", "dedup", "filters", "reshard"]
    assert steps["read"]["drops"] == {"corrupt": 1}  # the truncated shard, counted as one item
    assert steps["dedup"]["drops"] == {"exact_image": 4, "near_image": 3, "corrupt": 1}
    # no_text: the truncated shard's last sample came through without its caption (the cut fell in it)
    assert steps["filters"]["drops"] == {"caption_words": 5, "min_side": 3, "no_text": 1}
    for before_step, step in zip(report["steps"], report["steps"][1:]):
        assert step["n_in"] == before_step["n_out"]
    for step in report["steps"]:
        assert step["n_in"] == step["n_out"] + sum(step["drops"].values())
    got = read_output(tmp_path / "out")
    assert len(got) == report["n_out"] == steps["reshard"]["n_out"] and len(report["files"]) == 3
    assert not {"0003", "0007", "0020", "0029", "0005", "0026"} & set(keys(got))
    assert report["config"]["skipped"] == ["clip_score"]
    printed = capsys.readouterr().out
    assert "dedup" in printed and "exact_image 4" in printed and f"wrote {len(got)} of" in printed
    assert tree_digest(noisy) == before


def test_a_rerun_replaces_its_own_output(tmp_path, noisy):
    cfg = write_yaml(tmp_path / "c.yaml", steps_config(tmp_path / "out", noisy))
    assert main([str(cfg)]) == 0
    first = tree_digest(tmp_path / "out")
    assert main([str(cfg), "--output", str(tmp_path / "out")]) == 0
    assert tree_digest(tmp_path / "out") == first  # same input, same seed: the same bytes
    assert main([str(cfg), f"--input={noisy}/shard-000000.tar"]) == 0
    assert read_report(tmp_path / "out")["n_in"] == 10


@pytest.mark.parametrize("change,message", [
    (lambda c: c["steps"].append({"name": "dedupe"}), "unknown step 'dedupe'. Did you mean dedup?"),
    (lambda c: c["steps"][0].update(near_bitz=3), "unknown config key 'near_bitz' for DedupConfig. Did you mean"),
    (lambda c: c["steps"][1].update(min_side="big"), "steps\\[1\\] \\(filters\\): --min_side: 'big' is not a int"),
    (lambda c: c["steps"][1].update(languages=["xx"]), "unknown language code 'xx'"),
    (lambda c: c["steps"].append({"name": "dedup"}), "reshard writes the shards itself, so it must be the last"),
    (lambda c: c["steps"][0].update(enabled="no"), "enabled must be true or false"),
    (lambda c: c.update(outptu="x"), "unknown key 'outptu'"),
    (lambda c: c.pop("input"), "input: the shards to read"),
    (lambda c: c.update(steps=[]), "steps: a list of steps"),
    (lambda c: c.update(shard_max_count="many"), "shard_max_count: expected an integer"),
])
def test_bad_configs_fail_at_load_with_what_is_accepted(tmp_path, noisy, change, message):
    cfg = steps_config(tmp_path / "out", noisy)
    change(cfg)
    with pytest.raises(ValueError, match=message):
        load_pipeline(write_yaml(tmp_path / "c.yaml", cfg))
    assert not (tmp_path / "out").exists()  # nothing was written


def test_bad_config_through_the_command_line(tmp_path, noisy, capsys):
    cfg = steps_config(tmp_path / "out", noisy)
    cfg["steps"][0]["near_bitz"] = 3
    assert main([str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "near_bitz" in err and "Accepted keys" in err and "--color_tolerance" in err
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_step_modules_are_imported_only_when_enabled(tmp_path, noisy, monkeypatch):
    monkeypatch.setitem(pipeline.STEPS, "later", "data_tools.curate.not_written_yet")
    cfg = steps_config(tmp_path / "out", noisy)
    cfg["steps"].insert(0, {"name": "later", "enabled": False, "anything": 1})
    assert [s.name for s in load_pipeline(write_yaml(tmp_path / "c.yaml", cfg)).steps] == ["dedup", "filters",
                                                                                            "reshard"]
    cfg["steps"][0]["enabled"] = True
    with pytest.raises(ValueError, match="step 'later' is not available"):
        load_pipeline(write_yaml(tmp_path / "c.yaml", cfg))


def test_example_config_loads_and_runs(tmp_path, synth_data):
    loaded = load_pipeline(EXAMPLE)
    assert [s.name for s in loaded.steps] == ["dedup", "filters", "reshard"]
    assert loaded.skipped == ["clip_score", "balance"] and loaded.input == "data/clip_synth/train"
    report = run_pipeline(load_pipeline(EXAMPLE, {"input": str(synth_data / "train"),
                                                  "output": str(tmp_path / "out")}))
    assert report["n_in"] == 320 and 0 < report["n_out"] <= 320 and len(report["files"]) == 8


@pytest.mark.parametrize("name", ["clip_score", "balance"])
def test_example_keys_of_the_disabled_steps_are_theirs(name):
    """The model steps are off in the example; their keys must still be right for when they are switched on."""
    from mm.config import apply_overrides

    module = importlib.import_module(pipeline.STEPS[name])
    (entry,) = [s for s in yaml.safe_load(EXAMPLE.read_text())["steps"] if s["name"] == name]
    keys = {k: v for k, v in entry.items() if k not in pipeline.STEP_KEYS}
    assert keys, f"the example's {name} entry sets no keys"
    cfg = apply_overrides(pipeline.config_class(module)(), keys)  # raises on an unknown key or a wrong type
    assert {k: getattr(cfg, k) for k in keys} == keys
