"""Weight decay by parameter role, on ViT and ResNet towers; the schedule."""
import pytest
import timm

from mm.clip.model import create_clip
from mm.optim import WarmupCosine, no_decay_names, param_groups


def matrices_exempt(model):
    """The exempt parameters of 2+ dims (the interesting ones: 1-d tensors are always exempt)."""
    exempt = no_decay_names(model)
    return {n for n, p in model.named_parameters() if n in exempt and p.ndim >= 2}


def test_open_clip_vit_and_text_tower():
    model = create_clip("mm-test-micro").model
    assert matrices_exempt(model) == {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"}
    exempt = no_decay_names(model)
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "ln_final.bias"} <= exempt
    assert "visual.conv1.weight" not in exempt  # the patch embedding is a real weight matrix
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in exempt and "text_projection" not in exempt
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_open_clip_resnet_tower():
    model = create_clip("mm-tiny-rn-64").model
    assert matrices_exempt(model) == {"positional_embedding", "token_embedding.weight",
                                      "visual.attnpool.positional_embedding"}
    exempt = no_decay_names(model)
    assert "visual.conv1.weight" not in exempt and "visual.layer1.0.conv2.weight" not in exempt
    assert "visual.bn1.weight" in exempt and "visual.attnpool.q_proj.weight" not in exempt


def test_timm_vit_patch_embed_decays_position_and_class_tokens_do_not():
    """The old rule matched the substring "embed" and so also exempted patch_embed.proj.weight."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    assert matrices_exempt(model) == {"pos_embed", "cls_token"}
    assert "patch_embed.proj.weight" not in no_decay_names(model)


def test_frozen_parameters_are_left_out():
    model = create_clip("mm-test-micro").model
    model.visual.requires_grad_(False)
    n = sum(len(g["params"]) for g in param_groups(model, 0.1))
    assert n == sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 120))
