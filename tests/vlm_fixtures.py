"""What the vision-chat tests share: tiny synthetic chat data, running recipes/vlm/train.py as a user would,
and one tiny run trained once per session (its export answers with a stop token, so finish reasons and
streaming can be checked on a real model)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SUBPROCESS_ENV

# data_tools.synthetic_vlm, small: 60 multi-turn training lines (~120 tokens each), 30 held-out questions
TINY_VLM_DATA = {"train": 60, "align": 20, "heldout": 30, "prefs": 10}

# The tiny preset with batch_size and lr_multiplier left to auto (batch 1, x2) and 6 epochs: ~155 steps,
# ~10 s on one core. By then the model ends its answers with <|im_end|> (it says "nothing" to most questions).
TRAIN_EPOCHS = 6
TRAIN_ARGS = ["--config=tiny", "--batch_size=auto", "--lr_multiplier=auto", f"--n_epochs={TRAIN_EPOCHS}",
              "--max_steps=0", "--warmup_steps=10", "--ckpt_every=60"]


def tiny_vlm_data(tmp_path_factory) -> Path:
    """<base temp>/vlm_data (train.jsonl, heldout.jsonl, images/...), written by the first fixture of the
    session that asks and reused by the others (ensure_synthetic_vlm keeps a complete copy)."""
    from data_tools.synthetic_vlm import ensure_synthetic_vlm

    out = tmp_path_factory.getbasetemp() / "vlm_data"
    ensure_synthetic_vlm(out, **TINY_VLM_DATA)
    return out


def vlm_recipe_command(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "vlm" / "train.py"), *args]


def run_vlm_recipe(args: list[str], cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run recipes/vlm/train.py in a fresh process, as a user would (tests.helpers.run_asr_recipe's twin)."""
    proc = subprocess.run(vlm_recipe_command(args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def data_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--train_data={data}/train.jsonl", f"--eval_data={data}/heldout.jsonl", f"--out_dir={out}", *extra]


def trained_vlm_run(tmp_path_factory) -> Path:
    """<base temp>/vlm_trained_run: a recipes/vlm run folder (config.yaml, tokenizer/, checkpoints/, export/,
    metrics.jsonl, results.json, and the run's output in stdout.txt and stderr.txt), trained on
    tiny_vlm_data by the first fixture of the session that asks and reused by the others (stderr.txt,
    written last, marks a finished run)."""
    data = tiny_vlm_data(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "vlm_trained_run"
    if not (out / "stderr.txt").is_file():
        proc = run_vlm_recipe([*TRAIN_ARGS, *data_args(data, out)])
        (out / "stdout.txt").write_text(proc.stdout)
        (out / "stderr.txt").write_text(proc.stderr)
    return out


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory) -> Path:
    return tiny_vlm_data(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_vlm(tmp_path_factory) -> Path:
    return trained_vlm_run(tmp_path_factory)


@pytest.fixture(scope="module")
def vision_chat(trained_vlm):
    from mm.vlm.inference import VisionChat

    return VisionChat.from_checkpoint(trained_vlm)
