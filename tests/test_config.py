from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from tests.helpers import load_recipe
from mm.config import ConfigError, coerce, parse_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    lr: float = 1e-3  # learning rate
    steps: int = 10  # optimizer steps
    name: str = "run"  # run name
    flag: bool = False  # a switch
    resume: str | None = None  # optional path
    weights: list[float] | None = None  # per-source weights
    loss: Literal["clip", "siglip"] = "clip"  # which loss


def test_defaults_preset_then_overrides(tmp_path):
    (tmp_path / "small.yaml").write_text("steps: 3\nname: from-preset\n")
    cfg = parse_config(Demo, ["--config=small", "--lr=0.5", "--flag", "--weights=1,2.5"], tmp_path)
    assert cfg == Demo(lr=0.5, steps=3, name="from-preset", flag=True, resume=None, weights=[1.0, 2.5], loss="clip")


def test_space_separated_and_none(tmp_path):
    cfg = parse_config(Demo, ["--steps", "7", "--resume=none", "--flag=false"], tmp_path)
    assert (cfg.steps, cfg.resume, cfg.flag) == (7, None, False)


def test_unknown_key_lists_accepted_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(Demo, ["--stepz=3"], tmp_path)
    msg = str(e.value)
    assert "unknown config key 'stepz'" in msg and "Did you mean: steps" in msg
    for key in ("--lr=", "--steps=", "--name=", "--flag=", "--resume=", "--weights="):
        assert key in msg
    assert "learning rate" in msg  # field comments are the help text


@pytest.mark.parametrize("arg, fragment", [
    ("--steps=ten", "expected an integer"), ("--steps=1.5", "expected an integer"),
    ("--lr=fast", "expected a number"), ("--flag=maybe", "expected true/false"),
    ("--weights=1,x", "is not a"),
])
def test_wrong_types_are_errors(tmp_path, arg, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(Demo, [arg], tmp_path)


def test_wrong_type_in_preset_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("steps: [1, 2]\n")
    with pytest.raises(ConfigError, match="--steps: expected an integer"):
        parse_config(Demo, ["--config=bad"], tmp_path)


def test_missing_preset_names_the_available_ones(tmp_path):
    (tmp_path / "tiny.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"no preset 'huge'.*\['tiny'\]"):
        parse_config(Demo, ["--config=huge"], tmp_path)


def test_positional_argument_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="arguments are --key=value"):
        parse_config(Demo, ["steps=3"], tmp_path)


def test_help_lists_fields_and_exits_0(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, ["--lr=oops", "--help"], tmp_path)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--steps=10" in out and "optimizer steps" in out
    assert "--loss='clip'  (one of clip, siglip)  which loss" in out  # allowed values, from the type


def test_literal_values_are_checked_from_the_type(tmp_path):
    assert parse_config(Demo, ["--loss=siglip"], tmp_path).loss == "siglip"
    with pytest.raises(ConfigError, match="--loss=triplet: accepted values are clip, siglip"):
        parse_config(Demo, ["--loss=triplet"], tmp_path)
    (tmp_path / "bad.yaml").write_text("loss: softmax\n")
    with pytest.raises(ConfigError, match="--loss=softmax: accepted values are clip, siglip"):
        parse_config(Demo, ["--config=bad"], tmp_path)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError):
        coerce(True, int, "steps")


def test_saved_config_round_trips(tmp_path):
    cfg = Demo(lr=0.25, weights=[1.0, 3.0])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = parse_config(Demo, [f"--config={tmp_path / 'run' / 'config.yaml'}"], tmp_path)
    assert again == cfg


CLIP_PRESETS = sorted((ROOT / "recipes" / "clip" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", CLIP_PRESETS, ids=lambda p: p.stem)
def test_clip_preset_is_valid(preset):
    mod = load_recipe("clip")
    cfg = parse_config(mod.CLIPConfig, [f"--config={preset.stem}"], preset.parent)
    mod.check_config(cfg)
    assert yaml.safe_load(preset.read_text()), f"{preset} is empty"
    # the named model must exist (an open_clip name or one of our JSON configs)
    from mm.clip.model import resolve_model_name
    assert resolve_model_name(cfg.model)


def test_recipe_help_exits_0_and_shows_allowed_values():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/clip/train.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--precision='auto'  (one of auto, bf16, fp16, fp32)" in proc.stdout and "--resume_ignore_data" in proc.stdout
