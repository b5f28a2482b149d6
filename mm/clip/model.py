"""CLIP models from open_clip: by name, by JSON config, from a local checkpoint, and back from our runs.

Exports use open_clip's own `local-dir:` layout (open_clip_config.json + open_clip_model.safetensors),
so a model trained here loads in plain open_clip with
`open_clip.create_model_and_transforms("local-dir:runs/clip/export")`.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import open_clip
import torch

from mm.checkpoint import export_safetensors, list_checkpoints, load_checkpoint

# Our own small JSON model configs (mm-tiny-vit-64, ...) become open_clip model names.
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "recipes" / "clip" / "configs" / "models"
if MODEL_CONFIG_DIR.is_dir():
    open_clip.add_model_config(MODEL_CONFIG_DIR)

EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"


def resolve_model_name(model: str) -> str:
    """An open_clip model name, or a path to a JSON model config (registered under its file stem)."""
    if model.startswith(("local-dir:", "hf-hub:")):
        return model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model={model}: no such JSON model config")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"model={model!r} is neither an open_clip model name nor a .json config. "
                         f"Names: {', '.join(open_clip.list_models())}")
    return model


def create_clip(model: str, pretrained: str | None = None, siglip: bool = False):
    """(model, preprocess_train, preprocess_val, tokenizer, model_cfg) for `model`.

    pretrained: a local open_clip checkpoint file (or an open_clip tag, where the hub is reachable).
    siglip: adds the learnable logit bias and SigLIP's initial scale/bias (log 10, -10).
    """
    name = resolve_model_name(model)
    if pretrained and not Path(pretrained).is_file() and "/" in pretrained:
        raise FileNotFoundError(f"pretrained={pretrained}: no such checkpoint file")
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    net, pre_train, pre_val = open_clip.create_model_and_transforms(name, pretrained=pretrained, output_dict=True, **kwargs)
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name.split(":", 1)[1]) / EXPORT_CONFIG).read_text())["model_cfg"]
    else:
        cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg.update(kwargs)
    return net, pre_train, pre_val, open_clip.get_tokenizer(name), cfg


def lock_image_tower(model: torch.nn.Module) -> None:
    """LiT: freeze the image tower (its norms too) so only the text tower and the scale learn."""
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float = 100.0) -> None:
    """CLIP keeps exp(logit_scale) <= 100 for stability (Radford et al. 2021)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


def export_clip(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write `out_dir` in open_clip's local-dir layout: config JSON + safetensors weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    visual = model.visual
    preprocess = {"size": visual.image_size, "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
                  "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)}
    (out / EXPORT_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
    export_safetensors(model.state_dict(), out / EXPORT_WEIGHTS, metadata={"format": "open_clip"})
    return out


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer) from anything our CLIP recipe writes:
    an export folder, a run folder (its export, else its newest checkpoint), or a step_*.pt file."""
    path = Path(path)
    if path.is_dir() and (path / "export" / EXPORT_CONFIG).exists():
        path = path / "export"
    if path.is_dir() and not (path / EXPORT_CONFIG).exists():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path}: no export ({EXPORT_CONFIG}) and no step_*.pt checkpoints. "
                                    f"Train one with: python recipes/clip/train.py --out_dir={path}")
        path = found[-1][1]
    if path.is_dir():
        net, _, pre_val, tok, _ = create_clip(f"local-dir:{path}")
    elif path.is_file():
        ckpt = load_checkpoint(path)
        if "model_cfg" not in ckpt:
            raise ValueError(f"{path} is not a checkpoint written by recipes/clip/train.py (no model_cfg)")
        with tempfile.TemporaryDirectory() as tmp:  # rebuild through open_clip's own factory
            Path(tmp, EXPORT_CONFIG).write_text(json.dumps({"model_cfg": ckpt["model_cfg"]}))
            net, _, pre_val, tok, _ = create_clip(f"local-dir:{tmp}")
        net.load_state_dict(ckpt["model"])
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint, run folder or export folder")
    return net.to(device).eval(), pre_val, tok
