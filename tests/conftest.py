"""Shared fixtures: tiny synthetic shards (32-px images) made once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """data_tools' synthetic CLIP splits, small: 8 train shards of 40, 48 val, 2 per zero-shot class."""
    from data_tools.synthetic_clip import write_synthetic_clip

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_clip(out, train=320, val=48, zeroshot_per_class=2, image_size=32, per_shard=40, seed=0)
    return out




# A tiny CLIP trained by the recipe: 120 steps of batch 32 on the 320 synthetic pairs, ~10 s on one core.
# Enough for colour names to work zero-shot (~90% over 6 colours, chance 17%); shapes are not learned yet.
TRAIN_ARGS = ["--config=tiny", "--max_steps=120", "--batch_size=32", "--lr=3e-3", "--warmup_steps=10",
              "--eval_every=0", "--ckpt_every=1000", "--log_every=120"]


@pytest.fixture(scope="session")
def trained_clip(synth_data, tmp_path_factory) -> Path:
    """A run folder (runs/clip layout: export/, checkpoints/step_*.pt) of a tiny CLIP trained by the recipe."""
    from tests.helpers import run_recipe

    out = tmp_path_factory.mktemp("zeroshot_clip") / "run"
    run_recipe([*TRAIN_ARGS, f"--train_data={synth_data}/train", f"--val_data={synth_data}/val",
                f"--zeroshot_data={synth_data}/zeroshot", f"--out_dir={out}"])
    return out


@pytest.fixture(scope="session")
def classifier(trained_clip):
    from mm.zeroshot import ZeroShotClassifier

    return ZeroShotClassifier.from_checkpoint(trained_clip, device="cpu")
