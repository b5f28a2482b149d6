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


