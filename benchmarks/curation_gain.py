"""Benchmark: does curation pay? The default CLIP recipe trained for the same steps on noisy data and on the same
data curated (issue 10, "A measured gain").

    python benchmarks/curation_gain.py [--n=40000] [--max_steps=550] [--workdir=data/curation_gain] \\
        [--config=benchmarks/curation_gain.yaml]
    python benchmarks/curation_gain.py --skip_training=true     # data + dedup + filters only: tune them in a minute

1. data     data_tools.synthetic_noisy_clip: the built-in CLIP data with 30% swapped captions, 20% near-duplicate
            copies, tiny and extreme-aspect images, and truth.jsonl naming each fault; clean val/zero-shot splits.
2. noisy    recipes/clip/train.py (a subprocess) on the noisy train shards for max_steps.
3. curate   the pipeline of --config (data_tools.curate): dedup -> filters -> CLIP score (top k%, scored by the
            model of step 2, trained on the noisy data itself) -> reshard.
4. curated  the same recipe, the same steps, on the curated shards.
5. score    zero-shot top-1 of both runs; each step's drops against truth.jsonl (precision, recall).

Scoring. report.json keeps 5 examples per drop reason, so the benchmark records every drop as the steps report
it (Report.on_drop). A dedup drop is correct when the dropped sample and the kept sample it repeats (named in the drop's
detail) are in the same injected group {original, its copies}; recall is correct drops / injected copies (a group
of m loses m - 1 to a perfect dedup). A filters drop is correct when the sample is tiny or extreme_aspect, a
clip_score drop when its caption was swapped; their recall is over the targets that reached the step.

Writes <workdir>/results.json (the tables, the settings, the machine, wall times), <workdir>/drops.jsonl (every
drop), <workdir>/curate.yaml (the pipeline as run), logs/ of both runs, runs/noisy and runs/curated.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.curate.cli import print_summary  # noqa: E402
from data_tools.curate.pipeline import load_pipeline, run_pipeline  # noqa: E402
from data_tools.curate.report import CORRUPT, write_json_atomic  # noqa: E402
from data_tools.synthetic_clip import class_names  # noqa: E402
from data_tools.synthetic_noisy_clip import JPEG_SUBSAMPLING, KINDS, write_noisy_clip  # noqa: E402
from mm.config import ConfigError, apply_overrides, describe_fields, split_argv  # noqa: E402
from mm.shards import expand_shard_spec, read_samples  # noqa: E402

MODEL_STEPS = ("clip_score", "semdedup")  # pipeline steps that load a CLIP checkpoint: the noisy run's
RULE_TARGETS = {"filters": ("tiny", "extreme_aspect"), "clip_score": ("swapped",)}  # what each step should drop
DEDUP_DETAIL = re.compile(r"\b(?:as|from) (\S+?)(?: \(|$)")  # "... as 00000042 (shard-000001.tar)"


@dataclass
class GainConfig:
    n: int = 40000  # noisy training samples, faults included
    max_steps: int = 550  # optimizer steps of each CLIP run (the default recipe's)
    workdir: str = "data/curation_gain"  # data, curated shards, runs, logs and results.json go here
    config: str = "benchmarks/curation_gain.yaml"  # the curation pipeline (input, output, checkpoint set here)
    recipe_preset: str | None = None  # recipes/clip preset for both runs (tests: tiny); none: the default recipe
    seed: int = 0  # the noisy data's and both runs' seed
    per_shard: int = 2500  # samples per noisy train shard
    val: int = 1000  # held-out image-caption pairs (retrieval)
    zeroshot_per_class: int = 20  # held-out labelled images per class (zero-shot top-1)
    jpeg_subsampling: int = 0  # chroma of the JPEG copies: 0 = 4:4:4, 2 = 4:2:0 (harsh at 32 px: RESULTS.md)
    skip_training: bool = False  # data, dedup and filters only (no CLIP runs, no clip_score): for tuning


# ---------------------------------------------------------------- scoring against truth.jsonl

def load_truth(path: str | Path) -> dict[str, dict]:
    """truth.jsonl -> {key: its truth line}, in file order."""
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return {t["key"]: t for t in rows}


def duplicate_groups(truth: dict[str, dict]) -> dict[str, str]:
    """{key: its group id (the original's key)} for every original and copy; other samples are in no group."""
    groups = {}
    for key, t in truth.items():
        if t["kind"] == "near_dup":
            groups[key] = groups[t["original"]] = t["original"]
    return groups


def kept_ref(detail: str) -> str:
    """The key of the kept sample a dedup drop repeats, from the drop's detail; ValueError when it names none."""
    found = DEDUP_DETAIL.search(detail)
    if not found:
        raise ValueError(f"cannot find the kept sample in the dedup detail {detail!r}: has its format changed?")
    return found.group(1)


def ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def score_dedup(drops: list[dict], truth: dict[str, dict]) -> dict:
    """Precision and recall of one dedup step's drops ({"key", "reason", "detail"}) against the injected groups."""
    groups = duplicate_groups(truth)
    claims = [d for d in drops if d["reason"] != CORRUPT]
    correct = 0
    for d in claims:
        group = groups.get(d["key"])
        correct += group is not None and group == groups.get(kept_ref(d["detail"]))
    copies = sum(t["kind"] == "near_dup" for t in truth.values())
    return {"dropped": len(claims), "correct": correct, "precision": ratio(correct, len(claims)),
            "targets": copies, "recall": ratio(correct, copies),
            "by_reason": dict(Counter(d["reason"] for d in claims))}


def score_rule(drops: list[dict], entered: set[str], truth: dict[str, dict], kinds: tuple[str, ...]) -> dict:
    """Precision of a step's drops at catching samples of `kinds`, and recall over those that reached it
    (`entered`, the keys it saw) and over all injected."""
    dropped = {d["key"] for d in drops if d["reason"] != CORRUPT}
    targets = {k for k, t in truth.items() if t["kind"] in kinds}
    hit = len(dropped & targets)
    return {"dropped": len(dropped), "correct": hit, "precision": ratio(hit, len(dropped)),
            "targets": len(targets & entered), "recall": ratio(hit, len(targets & entered)),
            "recall_of_all_injected": ratio(hit, len(targets))}


def score_steps(step_names: list[str], drops: list[dict], truth: dict[str, dict]) -> dict:
    """{step: its scores}: dedup against the groups, filters and clip_score against their kinds, others counted."""
    entered, scores = set(truth), {}
    for name in step_names:
        mine = [d for d in drops if d["step"] == name]
        base = name.split("#")[0]
        if base == "dedup":
            scores[name] = score_dedup(mine, truth)
        elif base in RULE_TARGETS:
            scores[name] = {"targets_kinds": list(RULE_TARGETS[base]),
                            **score_rule(mine, entered, truth, RULE_TARGETS[base])}
        else:
            scores[name] = {"dropped": len(mine)}
        entered -= {d["key"] for d in mine}
    return scores


def count_kinds(keys, truth: dict[str, dict]) -> dict[str, int]:
    found = Counter(truth[k]["kind"] for k in keys)
    return {kind: found[kind] for kind in KINDS}


# ---------------------------------------------------------------- curating, with every drop recorded

def resolve_pipeline(config: Path, train: Path, output: Path, checkpoint: Path | None, dest: Path) -> Path:
    """The pipeline YAML with this run's input, output and checkpoint (model steps disabled without one),
    written to `dest` so it can be run again as it is."""
    data = yaml.safe_load(config.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise ConfigError(f"{config}: not a curation pipeline (a mapping with input, output and steps)")
    data.update(input=str(train), output=str(output))
    for entry in data["steps"]:
        if isinstance(entry, dict) and entry.get("name") in MODEL_STEPS:
            if checkpoint is None:
                entry["enabled"] = False
            else:
                entry["checkpoint"] = str(checkpoint)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(f"# resolved from {config} by benchmarks/curation_gain.py\n"
                   + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, dest)
    return dest


def curate(pipeline_yaml: Path) -> tuple[dict, list[dict]]:
    """Run the pipeline, every step's drops recorded; (report, drops)."""
    drops: list[dict] = []  # all of them: report.json keeps 5 examples a reason, and dedup's are scored by detail
    report = run_pipeline(load_pipeline(pipeline_yaml), source=str(pipeline_yaml), on_drop=drops.append)
    print_summary(report)
    return report, drops


def shard_keys(folder: Path) -> list[str]:
    counts = {"bad_shards": 0}
    keys = [s["__key__"] for s in read_samples(expand_shard_spec(str(folder))[0].urls, counts)]
    if counts["bad_shards"]:
        raise RuntimeError(f"{folder}: {counts['bad_shards']} unreadable shards in the curated output")
    return keys


def check_counts(report: dict, drops: list[dict], truth: dict[str, dict], output_keys: list[str]) -> None:
    """The funnel, the recorded drops and the shards written agree; RuntimeError (a bug) when not."""
    dropped = {d["key"] for d in drops}
    expected = set(truth) - dropped
    problems = []
    if report["n_in"] != len(truth):
        problems.append(f"read {report['n_in']} samples, truth.jsonl has {len(truth)}")
    if len(dropped) != len(drops):
        problems.append("a sample was dropped twice")
    if set(output_keys) != expected or len(output_keys) != len(expected) or report["n_out"] != len(expected):
        problems.append(f"wrote {len(output_keys)} samples (report: {report['n_out']}), expected {len(expected)}")
    if problems:
        raise RuntimeError("curation counts do not add up: " + "; ".join(problems))


# ---------------------------------------------------------------- data and training runs

def ensure_noisy_data(cfg: GainConfig, out: Path) -> dict:
    """The noisy data, reused when info.json says it was written with these settings."""
    want = {"train": cfg.n, "seed": cfg.seed, "per_shard": cfg.per_shard, "val": cfg.val,
            "zeroshot": cfg.zeroshot_per_class * len(class_names()),
            "dup_jpeg_chroma": JPEG_SUBSAMPLING.get(cfg.jpeg_subsampling)}
    info_path = out / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if all(info.get(k) == v for k, v in want.items()):
            print(f"reusing the noisy data in {out}", flush=True)
            return info
    return write_noisy_clip(out, n=cfg.n, seed=cfg.seed, per_shard=cfg.per_shard, val=cfg.val,
                            zeroshot_per_class=cfg.zeroshot_per_class, jpeg_subsampling=cfg.jpeg_subsampling)


def train_clip(cfg: GainConfig, name: str, train: Path, data: Path, work: Path) -> dict:
    """recipes/clip/train.py on `train` for max_steps into <work>/runs/<name> (replaced); its results.json."""
    out, log_path = work / "runs" / name, work / "logs" / f"{name}.log"
    shutil.rmtree(out, ignore_errors=True)  # our own earlier run: the recipe refuses a folder with checkpoints
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--train_data={train}", f"--val_data={data / 'val'}", f"--zeroshot_data={data / 'zeroshot'}",
            f"--out_dir={out}", f"--max_steps={cfg.max_steps}", f"--seed={cfg.seed}"]
    if cfg.recipe_preset:
        args.insert(0, f"--config={cfg.recipe_preset}")
    print(f"training on {name} data: {cfg.max_steps} steps (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "recipes/clip/train.py"), *args], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"the {name} run failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return {**json.loads((out / "results.json").read_text()), "run": str(out)}


# ---------------------------------------------------------------- the benchmark

def run(cfg: GainConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    config = Path(cfg.config) if Path(cfg.config).exists() else ROOT / cfg.config
    if not config.is_file():
        raise ConfigError(f"--config={cfg.config}: no such pipeline file")
    if cfg.n < 1 or cfg.per_shard < 1 or cfg.jpeg_subsampling not in JPEG_SUBSAMPLING:
        raise ConfigError(f"--n and --per_shard must be at least 1 and --jpeg_subsampling one of "
                          f"{sorted(JPEG_SUBSAMPLING)}; got {cfg.n}, {cfg.per_shard}, {cfg.jpeg_subsampling}")
    work.mkdir(parents=True, exist_ok=True)
    wall, runs = {}, {}
    t = time.perf_counter()
    print(f"[1/4] noisy data: {cfg.n} samples -> {work / 'data'}", flush=True)
    info = ensure_noisy_data(cfg, work / "data")
    truth = load_truth(work / "data" / "truth.jsonl")
    wall["data_s"] = time.perf_counter() - t
    checkpoint = None
    if not cfg.skip_training:
        t = time.perf_counter()
        print("[2/4] CLIP on the noisy data", flush=True)
        runs["noisy"] = train_clip(cfg, "noisy", work / "data" / "train", work / "data", work)
        wall["train_noisy_s"] = time.perf_counter() - t
        checkpoint = Path(runs["noisy"]["run"])
    t = time.perf_counter()
    print(f"[3/4] curating with {config}", flush=True)
    resolved = resolve_pipeline(config, work / "data" / "train", work / "curated", checkpoint, work / "curate.yaml")
    report, drops = curate(resolved)
    output_keys = shard_keys(work / "curated")
    check_counts(report, drops, truth, output_keys)
    wall["curate_s"] = time.perf_counter() - t
    if not cfg.skip_training:
        t = time.perf_counter()
        print("[4/4] CLIP on the curated data", flush=True)
        runs["curated"] = train_clip(cfg, "curated", work / "curated", work / "data", work)
        wall["train_curated_s"] = time.perf_counter() - t
    steps = [s["step"] for s in report["steps"][1:]]
    result = summarize(cfg, info, truth, report, drops, output_keys, runs, steps)
    result["wall_s"] = {k: round(v, 1) for k, v in wall.items()}
    write_json_atomic(work / "results.json", result)
    write_jsonl_atomic(work / "drops.jsonl", drops)
    return result


def summarize(cfg, info, truth, report, drops, output_keys, runs, steps) -> dict:
    top1 = {name: r.get("zeroshot_top1") for name, r in runs.items()}
    scores = score_steps(steps, drops, truth)
    dedup = next((s for name, s in scores.items() if name.startswith("dedup")), {})
    goals = {"dedup_recall_0.95_at_precision_0.95": bool(dedup) and (dedup["precision"] or 0) >= 0.95
             and (dedup["recall"] or 0) >= 0.95}
    if runs:
        goals["curated_beats_noisy"] = top1["curated"] > top1["noisy"]
    from benchmarks.clip_vs_open_clip import machine
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
        "settings": {**dataclasses.asdict(cfg), "dup_jpeg_chroma": info.get("dup_jpeg_chroma")},
        "zeroshot_top1": top1, "zeroshot_top5": {name: r.get("zeroshot_top5") for name, r in runs.items()},
        "samples": {"noisy": len(truth), "curated": len(output_keys)},
        "kinds": {"noisy": count_kinds(truth, truth), "curated": count_kinds(output_keys, truth)},
        "funnel": [{k: s[k] for k in ("step", "n_in", "n_out", "drops")} for s in report["steps"]],
        "steps": scores, "goals": goals,
    }


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def format_tables(result: dict) -> str:
    """The result as three small tables: runs, per-step precision/recall, the kinds left."""
    lines = []
    if result["zeroshot_top1"]:
        lines += ["| | noisy | curated |", "| --- | ---: | ---: |",
                  f"| train samples | {result['samples']['noisy']} | {result['samples']['curated']} |"]
        for k in ("zeroshot_top1", "zeroshot_top5"):
            lines.append(f"| zero-shot {k[-4:]} | {result[k]['noisy']:.4f} | {result[k]['curated']:.4f} |")
        lines.append("")
    lines += ["| step | in | out | dropped | correct | precision | recall | target |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    funnel = {f["step"]: f for f in result["funnel"]}
    for name, s in result["steps"].items():
        target = "injected copies" if name.startswith("dedup") else " + ".join(s.get("targets_kinds", [])) or "-"
        cells = [str(s.get(k)) if s.get(k) is not None else "-" for k in ("correct", "precision", "recall")]
        lines.append(f"| {name} | {funnel[name]['n_in']} | {funnel[name]['n_out']} | {s['dropped']} | "
                     f"{' | '.join(cells)} | {target} ({s.get('targets', '-')}) |")
    kinds = result["kinds"]
    lines += ["", "| kind | " + " | ".join(kinds["noisy"]) + " |", "| --- |" + " ---: |" * len(kinds["noisy"])]
    for name, counts in kinds.items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in counts.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nKeys:\n" + describe_fields(GainConfig))
        raise SystemExit(0)
    try:
        cfg = apply_overrides(GainConfig(), split_argv(argv))
        result = run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"curation_gain: {e}")
    print(f"\nmachine: {result['machine']['cpu']}, {result['machine']['cpu_cores']} cores\n{format_tables(result)}")
    print(f"goals: {result['goals']}\nwall: {result['wall_s']}\nfigures: {Path(cfg.workdir) / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
