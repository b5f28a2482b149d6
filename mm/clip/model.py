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
from typing import Callable, NamedTuple

import open_clip
import torch

from mm.checkpoint import SHARDED_STATE, CheckpointError, export_safetensors, list_checkpoints

# Our own small model configs (mm-tiny-rn-64, mm-test-micro, ...) ship with the library; a name is
# registered in open_clip's registry when it is first asked for (resolve_model_name), never at import.
MM_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
_REGISTERED: dict[str, Path] = {}  # name -> the JSON file it came from


class ClipParts(NamedTuple):
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    model_cfg: dict  # what rebuilds the model: saved in checkpoints and the export


def mm_model_names() -> list[str]:
    return sorted(p.stem for p in MM_MODEL_CONFIGS.glob("*.json"))


def register_model_config(path: str | Path) -> str:
    """Make a JSON model config an open_clip model name (its file stem) and return the name. A name that
    open_clip or an earlier file already uses for a different config is a ValueError naming both, never a
    silent overwrite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model={path}: no such JSON model config")
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{path}: not an open_clip model config (it needs embed_dim, vision_cfg and text_cfg)")
    name, existing = path.stem, open_clip.get_model_config(path.stem)
    if existing is not None and existing != cfg:
        other = _REGISTERED.get(name, "open_clip's own configs")
        raise ValueError(f"two different model configs are named {name!r}: {path} and {other}. Rename one file.")
    if existing is None:
        open_clip.add_model_config(path)
        _REGISTERED[name] = path
    return name


def resolve_model_name(model: str) -> str:
    """An open_clip model name, one of ours (mm_model_names()), or a path to a JSON model config."""
    if model.startswith(("local-dir:", "hf-hub:")):
        return model
    if model.endswith(".json"):
        return register_model_config(model)
    if open_clip.get_model_config(model) is not None:
        return model
    if (MM_MODEL_CONFIGS / f"{model}.json").is_file():
        return register_model_config(MM_MODEL_CONFIGS / f"{model}.json")
    raise ValueError(f"model={model!r} is neither an open_clip model name, one of ours ({', '.join(mm_model_names())}) "
                     f"nor a .json config. open_clip names: {', '.join(open_clip.list_models())}")


def create_clip(model: str, pretrained: str | None = None, siglip: bool = False) -> ClipParts:
    """The model, its train and val preprocessing, tokenizer and config for `model`.

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
    return ClipParts(net, pre_train, pre_val, open_clip.get_tokenizer(name), cfg)


def lock_image_tower(model: torch.nn.Module) -> None:
    """LiT: freeze the image tower (its norms too) so only the text tower and the scale learn."""
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float = 100.0) -> None:
    """CLIP keeps exp(logit_scale) <= 100 for stability (Radford et al. 2021)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


def export_clip(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `out_dir` in open_clip's local-dir layout: config JSON + safetensors weights
    (`state_dict`, default the model's own; a sharded model's comes from train_state.full_state_dict)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    visual = model.visual
    preprocess = {"size": visual.image_size, "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
                  "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)}
    (out / EXPORT_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
    export_safetensors(model.state_dict() if state_dict is None else state_dict, out / EXPORT_WEIGHTS,
                       metadata={"format": "open_clip"})
    return out


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer) from anything our CLIP recipe writes:
    an export folder, a run folder (its export, else its newest checkpoint), or a checkpoint
    (a step_*.pt file, or a sharded step_* folder). Files are read with weights_only=True."""
    from mm.train_state import load_model_weights

    path = Path(path)
    if path.is_dir() and (path / "export" / EXPORT_CONFIG).exists():
        path = path / "export"
    sharded_checkpoint = (path / SHARDED_STATE).is_file()
    if path.is_dir() and not (path / EXPORT_CONFIG).exists() and not sharded_checkpoint:
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path}: no export ({EXPORT_CONFIG}) and no step_* checkpoints. "
                                    f"Train one with: python recipes/clip/train.py --out_dir={path}")
        path = found[-1][1]
    if path.is_dir() and (path / EXPORT_CONFIG).exists():
        parts = create_clip(f"local-dir:{path}")
    elif path.exists():
        weights, rest = load_model_weights(path)
        model_cfg = rest.get("extra", {}).get("model_cfg")
        if model_cfg is None:
            raise CheckpointError(f"{path} is not a checkpoint written by recipes/clip/train.py (no model config in it)")
        with tempfile.TemporaryDirectory() as tmp:  # rebuild through open_clip's own factory
            Path(tmp, EXPORT_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}))
            parts = create_clip(f"local-dir:{tmp}")
        parts.model.load_state_dict(weights)
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint, run folder or export folder")
    return parts.model.to(device).eval(), parts.preprocess_val, parts.tokenizer
