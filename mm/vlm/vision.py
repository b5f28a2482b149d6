"""Vision towers that turn images into patch tokens for a language model.

One spec string names where a tower comes from; the tower keeps a JSON `config` that rebuilds the same
architecture without its weights file (save_vlm stores it, load_vlm rebuilds from it):

    clip:PATH            our CLIP recipe's export folder or run folder (open_clip local-dir layout)
    open_clip:NAME       an open_clip model name, one of ours (mm/clip/model_configs) or a .json config,
                         with `weights=` a local checkpoint (safetensors, or a torch file read weights_only)
    timm:NAME            a timm model, built with pretrained=False, with `weights=` a local state dict
    hf:DIR (or DIR)      a Hugging Face CLIPVisionModel / SiglipVisionModel directory (config.json)

Which tokens: a convnet (open_clip ModifiedResNet, timm ResNet/ConvNeXt...) gives its last spatial feature map
before pooling, [B, C, h, w] -> [B, h*w, C] (an open_clip ModifiedResNet: the map of stage `layer`, -1 the
last, -2 the one before, with 2x the grid); a ViT gives the patch tokens of block `layer` (default -2, the
penultimate block, as LLaVA: the last block is shaped by CLIP's pooled objective), class tokens dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mm.clip.model import EXPORT_CONFIG, EXPORT_WEIGHTS, resolve_model_name

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip / LLaVA default normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    """forward(pixels [B, 3, H, W]) -> tokens [B, num_tokens, out_dim].

    `config` (JSON) rebuilds the backbone without weights: build_vision_tower(config). A tower whose
    parameters are all frozen stays in eval mode under .train(), so a frozen BatchNorm's statistics do
    not drift while the rest of the model trains.
    """

    def __init__(self, backbone: nn.Module, config: dict):
        super().__init__()
        self.backbone, self.config = backbone, config
        self.source, self.layer = config["source"], config.get("layer", -2)
        self.image_size = int(config["image_size"])
        self.mean, self.std = tuple(config["mean"]), tuple(config["std"])
        self._tokens = _TOKEN_FUNCTIONS[self.source]
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():  # one probe gives N and D whatever the source: no per-architecture arithmetic
            probe = self._tokens(backbone, torch.zeros(1, 3, self.image_size, self.image_size), self.layer)
        backbone.train(was_training)
        self.num_tokens, self.out_dim = int(probe.shape[1]), int(probe.shape[2])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._tokens(self.backbone, pixels, self.layer)

    def train(self, mode: bool = True):
        trainable = any(p.requires_grad for p in self.parameters())
        return super().train(mode and trainable)

    def describe(self) -> dict:
        """What save_vlm stores: the rebuild config plus the dims it yields."""
        return {**self.config, "num_tokens": self.num_tokens, "out_dim": self.out_dim}


# ---------------------------------------------------------------- tokens per source
def _map_to_tokens(features: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[B, C, h, w] (or [B, h, w, C]) -> [B, h*w, C], row-major over the grid (pixel shuffle relies on it)."""
    if not channels_last:
        features = features.permute(0, 2, 3, 1)
    return features.flatten(1, 2)


def _open_clip_tokens(visual: nn.Module, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    from open_clip.modified_resnet import ModifiedResNet

    if isinstance(visual, ModifiedResNet):  # blocks are [stem, layer1..layer4]: -1 is layer4, before attnpool
        out = visual.forward_intermediates(pixels, indices=[layer if layer < 0 else -1], intermediates_only=True)
        return _map_to_tokens(out["image_intermediates"][0])
    out = visual.forward_intermediates(pixels, indices=[layer], stop_early=True, intermediates_only=True,
                                       output_fmt="NLC")  # open_clip drops the class token here
    return out["image_intermediates"][0]


def _timm_tokens(model: nn.Module, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    if getattr(model, "num_prefix_tokens", None) is not None:  # ViT family: prefix (class/register) tokens dropped
        return model.forward_intermediates(pixels, indices=[layer], stop_early=True, intermediates_only=True,
                                           output_fmt="NLC")[0]
    return _map_to_tokens(model.forward_features(pixels), getattr(model, "output_fmt", "NCHW") == "NHWC")


def _hf_tokens(model: nn.Module, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]  # [0] is the embeddings
    return hidden[:, 1:] if model.config.model_type == "clip_vision_model" else hidden  # SigLIP has no CLS


_TOKEN_FUNCTIONS = {"clip": _open_clip_tokens, "open_clip": _open_clip_tokens, "timm": _timm_tokens, "hf": _hf_tokens}


# ---------------------------------------------------------------- building
def build_vision_tower(config: dict) -> VisionTower:
    """A randomly initialised tower of the architecture `config` describes (from VisionTower.config)."""
    source = config["source"]
    if source in ("clip", "open_clip"):
        # Only the image tower: open_clip's CLIP.__init__ builds `visual` with this same function, so a
        # CLIP state dict's "visual.*" weights fit it, and we skip the text tower (~3M params even when tiny).
        from open_clip.model import _build_vision_tower

        cfg = config["model_cfg"]
        backbone = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    elif source == "timm":
        import timm

        backbone = timm.create_model(config["name"], pretrained=False, num_classes=0, **config.get("kwargs", {}))
    elif source == "hf":
        from transformers import AutoConfig, AutoModel

        hf_config = AutoConfig.for_model(**config["hf_config"])
        backbone = AutoModel.from_config(hf_config, attn_implementation="eager")
    else:
        raise ValueError(f"vision tower source {source!r} is not one of {sorted(_TOKEN_FUNCTIONS)}")
    return VisionTower(backbone, config)


def load_vision_tower(spec: str, weights: str | Path | None = None, layer: int = -2,
                      timm_kwargs: dict | None = None, image_size: int | None = None) -> VisionTower:
    """A tower with its weights, from a spec (see the module docstring); eval mode, trainable until frozen.

    weights: the local weights file for open_clip: and timm: specs (nothing is downloaded; None keeps the
    random init, for tests). timm_kwargs: extra timm.create_model arguments, e.g. {"img_size": 64}.
    image_size: feed a convolutional tower images of this size instead of its own (a larger grid of tokens).
    """
    source, _, target = spec.partition(":") if spec.split(":", 1)[0] in _TOKEN_FUNCTIONS else ("", "", spec)
    if not source:  # a bare directory: ours if it has a CLIP export, else a Hugging Face vision model
        path = Path(spec)
        source = "clip" if (path / EXPORT_CONFIG).is_file() or (path / "export" / EXPORT_CONFIG).is_file() else "hf"
    if source == "clip":
        config, state = _from_clip_run(Path(target))
    elif source == "open_clip":
        config, state = _from_open_clip(target, weights)
    elif source == "timm":
        config, state = _from_timm(target, weights, timm_kwargs or {})
    else:
        config, state = _from_hf(Path(target))
    config["layer"] = layer
    if image_size:
        convnet = config["source"] in ("clip", "open_clip") and isinstance(config["model_cfg"]["vision_cfg"].get("layers"), (list, tuple))
        if not convnet and config["source"] != "timm":
            raise ValueError(f"vision tower {spec}: image_size= is for convolutional towers (a ViT's position "
                             f"table has its own size; timm ViTs take timm_kwargs={{'img_size': ...}})")
        config["image_size"] = int(image_size)
    tower = build_vision_tower(config)
    if state is not None:
        missing, unexpected = tower.backbone.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"vision tower {spec} (weights {weights or target}): weights missing for "
                             f"{len(missing)} parameters, e.g. {missing[:5]}")
    return tower.eval()


def _from_clip_run(path: Path) -> tuple[dict, dict]:
    """The image tower of our CLIP recipe's export, from an export folder or a run folder holding export/."""
    from safetensors.torch import load_file

    if (path / "export" / EXPORT_CONFIG).is_file():
        path = path / "export"
    if not (path / EXPORT_CONFIG).is_file():
        raise FileNotFoundError(f"clip:{path}: no {EXPORT_CONFIG} there or in {path}/export. Export the CLIP run "
                                f"first (recipes/clip/train.py writes runs/<name>/export at the end).")
    saved = json.loads((path / EXPORT_CONFIG).read_text())
    config = _open_clip_config("clip", saved["model_cfg"], saved.get("preprocess_cfg", {}))
    return config, _visual_weights(load_file(path / EXPORT_WEIGHTS))


def _from_open_clip(name: str, weights: str | Path | None) -> tuple[dict, dict | None]:
    import open_clip

    model_cfg = open_clip.get_model_config(resolve_model_name(name))
    vision_cfg = model_cfg["vision_cfg"]  # SigLIP-style configs carry their own normalisation, the rest use OpenAI's
    preprocess = {"mean": vision_cfg.get("image_mean") or OPENAI_MEAN, "std": vision_cfg.get("image_std") or OPENAI_STD}
    config = _open_clip_config("open_clip", model_cfg, preprocess)
    return config, None if weights is None else _visual_weights(read_state_dict(weights))


def _open_clip_config(source: str, model_cfg: dict, preprocess: dict) -> dict:
    size = preprocess.get("size", model_cfg["vision_cfg"].get("image_size", 224))
    return {"source": source, "model_cfg": model_cfg, "image_size": size if isinstance(size, int) else size[0],
            "mean": list(preprocess.get("mean", OPENAI_MEAN)), "std": list(preprocess.get("std", OPENAI_STD))}


def _visual_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP state dict's image tower, keys without the "visual." prefix (a bare tower's dict passes through)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return visual or state


def _from_timm(name: str, weights: str | Path | None, kwargs: dict) -> tuple[dict, dict | None]:
    import timm

    probe = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    data = timm.data.resolve_model_data_config(probe)
    size = kwargs.get("img_size", data["input_size"][-1])
    config = {"source": "timm", "name": name, "kwargs": kwargs, "image_size": size if isinstance(size, int) else size[0],
              "mean": list(data["mean"]), "std": list(data["std"])}
    if weights is None:
        return config, None
    state = read_state_dict(weights)
    head = {k for k in state if k.startswith(("head.", "fc.", "classifier."))}  # num_classes=0 has no head
    return config, {k: v for k, v in state.items() if k not in head}


def _from_hf(path: Path) -> tuple[dict, dict]:
    from transformers import AutoConfig, AutoModel

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hf:{path}: no config.json (expected a CLIPVisionModel or SiglipVisionModel folder)")
    hf_config = AutoConfig.from_pretrained(path)
    if hf_config.model_type in ("clip", "siglip"):  # a full dual-encoder folder: take its vision half
        hf_config = hf_config.vision_config
    if hf_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"hf:{path}: model_type {hf_config.model_type!r} is not a CLIP or SigLIP vision model")
    model = AutoModel.from_pretrained(path, config=hf_config)
    mean, std = _hf_normalisation(path, hf_config.model_type)
    config = {"source": "hf", "hf_config": hf_config.to_dict(), "image_size": hf_config.image_size,
              "mean": mean, "std": std}
    return config, model.state_dict()


def _hf_normalisation(path: Path, model_type: str) -> tuple[list, list]:
    """The folder's preprocessor_config.json mean/std; without one, CLIP's or SigLIP's (0.5) defaults."""
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        if "image_mean" in cfg:
            return list(cfg["image_mean"]), list(cfg["image_std"])
    return (list(OPENAI_MEAN), list(OPENAI_STD)) if model_type == "clip_vision_model" else ([0.5] * 3, [0.5] * 3)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local file: safetensors, or a torch file read with weights_only=True (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={path}: no such file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


# ---------------------------------------------------------------- preprocessing
def image_transform(tower: VisionTower, train: bool):
    """PIL image -> [3, S, S] float tensor normalised for `tower`. Training adds a mild random crop only: no
    flips, since captions and answers say "left" and "right"."""
    from torchvision import transforms as T

    size, bicubic = tower.image_size, T.InterpolationMode.BICUBIC
    resize = ([T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=bicubic)] if train
              else [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    return T.Compose([T.Lambda(_rgb), *resize, T.ToTensor(), T.Normalize(tower.mean, tower.std)])


def _rgb(image):  # a module-level function, not a lambda, so the transform pickles into loader workers
    return image.convert("RGB")
