"""Benchmark: the README's main job, `python recipes/clip/train.py` with no arguments, from nothing.

Runs the recipe as a new user does, in a fresh empty folder (so the built-in data is generated, counted in
the time), and prints the wall time, the zero-shot top-1 it reached and the machine. The bar (issue 6):
at most 5 minutes on the slower of the two 2-core machines here (Intel Xeon, 2.5 GHz), top-1 >= 0.90.

    python benchmarks/clip_default_run.py              # one run
    python benchmarks/clip_default_run.py --runs=3     # spread between runs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import busy_cpu_seconds, children_cpu_seconds, machine  # noqa: E402


def run_default(work: Path) -> dict:
    """`python recipes/clip/train.py` in `work`; wall seconds, CPU use, and its results.json."""
    busy0, own0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/clip/train.py")], cwd=work, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the default run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    own = children_cpu_seconds() - own0
    results = json.loads((work / "runs/clip/results.json").read_text())
    return {"wall_s": wall, "zeroshot_top1": results["zeroshot_top1"], "cores_used": own / wall,
            "other_cores": max(0.0, (busy_cpu_seconds() - busy0 - own) / wall)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1, help="how many times to run it (each from nothing)")
    p.add_argument("--out", default="runs/bench_default/results.json", help="where to write the figures")
    args = p.parse_args(argv)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}", flush=True)
    rows = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="mm-default-run-") as tmp:
            row = run_default(Path(tmp))
        rows.append(row)
        print(f"run {i + 1}: {row['wall_s']:.1f} s wall ({row['wall_s'] / 60:.2f} min), zero-shot top-1 "
              f"{row['zeroshot_top1']:.4f}, {row['cores_used']:.2f} cores busy, {row['other_cores']:.2f} busy "
              f"elsewhere", flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": m, "command": " ".join(sys.argv), "runs": rows}, indent=1))
    print(f"figures: {out}")
    return rows


if __name__ == "__main__":
    main()
