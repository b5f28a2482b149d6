"""Vision towers: every source gives [B, N, D] patch tokens from its own weights, ViTs from the penultimate
block without the class token, convnets from the last map before pooling; frozen towers get no gradients."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mm.vlm.model import freeze
from mm.vlm.vision import build_vision_tower, image_transform, load_vision_tower

TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


def pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """Our CLIP recipe's export layout for the tiny ResNet config at 64 px (the default run's family)."""
    from mm.clip.model import create_clip, export_clip

    torch.manual_seed(0)
    parts = create_clip("mm-tiny-rn-64")
    return export_clip(parts.model, parts.model_cfg, tmp_path_factory.mktemp("clip") / "export"), parts.model


def test_clip_export_resnet_tokens_are_the_map_before_pooling(clip_export):
    """layer=-1: the last stage's map (before attention pooling); the default -2: the stage before, 2x the grid."""
    folder, clip = clip_export
    tower = load_vision_tower(f"clip:{folder}", layer=-1)
    assert (tower.num_tokens, tower.out_dim, tower.image_size) == (4, 16 * 32, 64)  # 64 px / 32 = 2x2, width*32
    x = pixels(size=64)
    visual = clip.visual.eval()
    with torch.no_grad():
        stage3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(x))))  # [2, 256, 4, 4]
        fmap = visual.layer4(stage3)  # [2, 512, 2, 2]
        tokens = tower(x)
        penultimate = load_vision_tower(f"clip:{folder}")
        assert (penultimate.num_tokens, penultimate.out_dim) == (16, 16 * 16)
        torch.testing.assert_close(penultimate(x), stage3.flatten(2).transpose(1, 2))
        bigger = load_vision_tower(f"clip:{folder}", layer=-1, image_size=128)  # a convnet takes any input size
        assert bigger.num_tokens == 16 and bigger(pixels(size=128)).shape == (2, 16, 512)
    assert tokens.shape == (2, 4, 512)
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))  # the export's weights, row-major grid
    assert load_vision_tower(str(folder.parent / "export")).source == "clip"  # a bare folder is recognised


def test_open_clip_vit_takes_the_penultimate_block_without_cls(tmp_path):
    from mm.clip.model import create_clip

    cfg = tmp_path / "vlm-test-vit-32.json"
    cfg.write_text(json.dumps(TINY_VIT))
    torch.manual_seed(1)
    clip = create_clip(str(cfg)).model.eval()
    save_file(clip.state_dict(), tmp_path / "w.safetensors")
    tower = load_vision_tower(f"open_clip:{cfg}", weights=tmp_path / "w.safetensors")
    assert (tower.num_tokens, tower.out_dim) == (16, 32)
    x = pixels()
    with torch.no_grad():
        h = clip.visual._embeds(x)  # patch embed + CLS + positions + ln_pre
        for block in clip.visual.transformer.resblocks[:-1]:
            h = block(h)
        torch.testing.assert_close(tower(x), h[:, 1:])
        assert not torch.allclose(load_vision_tower(f"open_clip:{cfg}", weights=tmp_path / "w.safetensors",
                                                    layer=-1)(x), h[:, 1:])


def test_timm_resnet_from_a_torch_file(tmp_path):
    import timm

    torch.manual_seed(2)
    net = timm.create_model("resnet10t", pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / "r.pt")
    tower = load_vision_tower("timm:resnet10t", weights=tmp_path / "r.pt", timm_kwargs={})
    x = pixels(size=64)
    with torch.no_grad():
        expected = net.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tower(x), expected)
    assert (tower.image_size, tower.num_tokens, tower.out_dim) == (176, 6 * 6, 512)  # timm's default size, stride 32


def test_timm_vit_uses_penultimate_block(tmp_path):
    torch.manual_seed(3)
    kwargs = {"img_size": 32, "depth": 3}
    tower = load_vision_tower("timm:vit_tiny_patch16_224", timm_kwargs=kwargs)
    assert (tower.num_tokens, tower.out_dim, tower.image_size) == (4, 192, 32)
    x = pixels()
    with torch.no_grad():
        before = tower(x)
        tower.backbone.blocks[-1].mlp.fc2.weight.add_(1.0)  # the last block must not matter
        torch.testing.assert_close(tower(x), before)
        tower.backbone.blocks[0].mlp.fc2.weight.add_(1.0)
        assert not torch.allclose(tower(x), before)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_model_equals_hidden_states_minus_cls(tmp_path, kind):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_cls, model_cls = (CLIPVisionConfig, CLIPVisionModel) if kind == "clip" else (SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(4)
    hf = model_cls(config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8)).eval()
    hf.save_pretrained(tmp_path)
    tower = load_vision_tower(f"hf:{tmp_path}")
    x = pixels()
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(x), hidden[:, 1:] if kind == "clip" else hidden)
    assert (tower.num_tokens, tower.out_dim) == (16, 32)
    assert tower.mean == ((0.5,) * 3 if kind == "siglip" else tower.mean)


def test_rebuild_from_config_without_the_weights_file(clip_export):
    folder, _ = clip_export
    tower = load_vision_tower(f"clip:{folder}")
    rebuilt = build_vision_tower(json.loads(json.dumps(tower.describe())))  # through JSON, as save_vlm stores it
    rebuilt.load_state_dict(tower.state_dict())
    x = pixels(size=64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), tower(x))


def test_frozen_tower_gets_no_gradients_and_stays_in_eval(clip_export):
    folder, _ = clip_export
    tower = freeze(load_vision_tower(f"clip:{folder}"))
    head = torch.nn.Linear(tower.out_dim, 1)
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())  # BatchNorm stats stay put
    head(tower(pixels(size=64))).sum().backward()
    assert all(p.grad is None for p in tower.parameters()) and head.weight.grad is not None


def test_image_transform_normalises_to_the_tower_size(clip_export):
    folder, _ = clip_export
    tower = load_vision_tower(f"clip:{folder}")
    gray = Image.new("L", (90, 50), color=128)
    for train in (False, True):
        out = image_transform(tower, train)(gray)
        assert out.shape == (3, 64, 64)
        expected = (128 / 255 - torch.tensor(tower.mean)) / torch.tensor(tower.std)
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        load_vision_tower(f"clip:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_vision_tower("timm:resnet10t", weights=tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vision_tower(f"hf:{tmp_path}")
