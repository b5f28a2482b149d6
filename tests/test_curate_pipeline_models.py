"""The pipeline with every model step (semdedup -> clip_score -> balance -> reshard) on a tiny CLIP trained by the
recipe: each step's funnel counts add up and chain, planted copies and most mismatched captions go, caps hold,
the output holds the input's bytes, and the checkpoint is loaded once for both model steps."""
from __future__ import annotations

import io

import yaml

from data_tools.curate.__main__ import main
from data_tools.curate.embed import load_classifier
from tests.curate_fixtures import keys, pair, read_output, read_report, write_shards


def png(image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def planted_samples() -> list[dict]:
    """24 true pairs, 6 pairs whose captions describe another image, and 5 copies of true pairs' images
    (3 byte-identical, 2 the same pixels re-encoded) under new keys: 35 samples."""
    from tests.zeroshot_fixtures import render_shapes

    rendered = render_shapes(30, seed=21)
    samples = [pair(f"true{i:02d}", png(im), label) for i, (im, label) in enumerate(rendered[:24])]
    wrong = rendered[24:]
    samples += [pair(f"swap{i:02d}", png(im), wrong[(i + 1) % 6][1]) for i, (im, _) in enumerate(wrong)]
    samples += [dict(samples[i], __key__=f"same{i:02d}") for i in (0, 5, 10)]
    samples += [pair(f"copy{i:02d}", png(rendered[i][0], level=1), rendered[i][1]) for i in (2, 7)]
    return samples


def test_pipeline_with_every_model_step(trained_clip, tmp_path, capsys):
    samples = planted_samples()
    write_shards(tmp_path / "in", samples, per_shard=10)
    config = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "steps": [
        {"name": "semdedup", "checkpoint": str(trained_clip), "eps": 1e-4, "keep": "first", "device": "cpu"},
        {"name": "clip_score", "checkpoint": str(trained_clip), "top_percent": 80, "device": "cpu"},
        {"name": "balance", "entries": ["red", "blue"], "cap": 3},
        {"name": "reshard", "n_shards": 2, "seed": 0},
    ]}
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(config))
    load_classifier.cache_clear()
    assert main([str(tmp_path / "curate.yaml")]) == 0
    assert load_classifier.cache_info().misses == 1  # one model load serves both model steps

    report = read_report(tmp_path / "out")
    steps = {s["step"]: s for s in report["steps"]}
    assert [s["step"] for s in report["steps"]] == ["read", "semdedup", "clip_score", "balance", "reshard"]
    for before, after in zip(report["steps"], report["steps"][1:]):
        assert after["n_in"] == before["n_out"]
    for s in report["steps"]:
        assert s["n_in"] == s["n_out"] + sum(s["drops"].values())
    assert steps["semdedup"]["drops"] == {"semantic_duplicate": 5}
    assert (steps["clip_score"]["n_in"], steps["clip_score"]["n_out"]) == (30, 24)  # ceil(30 * 0.8)
    assert set(steps["balance"]["stats"]["top_entries"].values()) <= {1, 2, 3}

    out = read_output(tmp_path / "out")
    assert len(out) == report["n_out"] == steps["reshard"]["n_out"]
    by_key = {s["__key__"]: s for s in samples}
    assert all(s == by_key[s["__key__"]] for s in out)  # byte-identical copies of kept samples
    assert not any(k.startswith(("same", "copy")) for k in keys(out))
    assert sum(k.startswith("swap") for k in keys(out)) <= 2  # of 6 mismatched captions
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("semdedup", "clip_score", "balance", "semantic_duplicate"))
