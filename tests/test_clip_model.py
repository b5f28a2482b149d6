"""Model configs: ours ship with the library and register when asked for, never at import; two different
configs with one name are an error, not a silent overwrite."""
import json
import subprocess
import sys

import open_clip
import pytest

from mm.clip.model import mm_model_names, register_model_config, resolve_model_name
from tests.helpers import ROOT


def test_importing_the_library_registers_nothing():
    code = ("import open_clip, mm.clip.model, mm.zeroshot.classifier; "
            "print(open_clip.get_model_config('mm-tiny-rn-64') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_our_names_resolve_from_the_library_not_a_recipe():
    assert {"mm-tiny-rn-64", "mm-test-micro", "mm-tiny-vit-64"} <= set(mm_model_names())
    assert resolve_model_name("mm-tiny-rn-64") == "mm-tiny-rn-64"
    assert open_clip.get_model_config("mm-tiny-rn-64")["vision_cfg"]["image_size"] == 64
    with pytest.raises(ValueError, match="neither an open_clip model name, one of ours"):
        resolve_model_name("no-such-model")


def test_two_configs_with_one_name_are_an_error(tmp_path):
    cfg = json.loads((ROOT / "mm/clip/model_configs/mm-test-micro.json").read_text())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "my-clip.json"
    first.write_text(json.dumps(cfg))
    assert register_model_config(first) == "my-clip"
    same = tmp_path / "b" / "my-clip.json"
    same.write_text(json.dumps(cfg, indent=2))  # the same config: fine
    assert resolve_model_name(str(same)) == "my-clip"
    other = tmp_path / "b" / "my-clip.json"
    other.write_text(json.dumps({**cfg, "embed_dim": 64}))
    with pytest.raises(ValueError, match=r"two different model configs are named 'my-clip': .*b/my-clip.json and .*a/my-clip.json"):
        resolve_model_name(str(other))
    assert open_clip.get_model_config("my-clip")["embed_dim"] == cfg["embed_dim"]  # the first one still stands
    vit = tmp_path / "ViT-B-32.json"
    vit.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="open_clip's own configs"):
        register_model_config(vit)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not an open_clip model config"):
        register_model_config(tmp_path / "junk.json")
