"""The composed VLM: packed batches (one row, position_ids restarting, no mask) give each sample exactly the
logits and loss it gets alone, with mm_varlen, sdpa and eager; the guard refuses the layouts that leak; padded
batches agree; save/load, LoRA and parameter groups behave."""
import copy
import shutil

import pytest
import torch

from mm.vlm.lm import TINY_ROPE_THETA, load_lm
from mm.vlm.model import (IGNORE_INDEX, Projector, apply_lora, batch_loss, build_vlm, freeze, grid_positions, lm_loss,
                          load_vlm, loss_positions, pack_batch, pad_batch,
                          param_groups, pixel_shuffle, save_vlm, sequence_logprobs, set_gradient_checkpointing, unpack)
from mm.vlm.vision import load_vision_tower

TEXTS = ["What colour is the circle?", "It is red.", "Where is the square?", "On the left, above a blue line.",
         "Describe the image.", "A green triangle next to a small yellow star."] * 8


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    from mm.clip.model import create_clip, export_clip

    torch.manual_seed(0)
    parts = create_clip("mm-tiny-rn-64")  # our CLIP recipe's tiny ResNet family: 64 px -> 2x2 tokens of 512
    return export_clip(parts.model, parts.model_cfg, tmp_path_factory.mktemp("clip") / "export")


@pytest.fixture(scope="module")
def vlm(clip_export, tmp_path_factory):
    torch.manual_seed(0)
    lm, tokenizer = load_lm("tiny", texts=TEXTS, vocab_size=300, tokenizer_dir=tmp_path_factory.mktemp("tok"))
    model = build_vlm(freeze(load_vision_tower(f"clip:{clip_export}")), lm, tokenizer)
    return model.eval(), tokenizer


def make_sample(tokenizer, turns, n_images_first: int, seed: int, tokens_per_image: int) -> dict:
    """A ChatML sample: user turns (with images in the first one) and assistant answers (the targets)."""
    ids, labels = [], []
    for k, (question, answer) in enumerate(turns):
        images = "<image>" * tokens_per_image * (n_images_first if k == 0 else 0)
        prompt = tokenizer(f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        reply = tokenizer(f"{answer}<|im_end|>\n")["input_ids"]
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    pixels = torch.randn(n_images_first, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels if n_images_first else None}


@pytest.fixture(scope="module")
def samples(vlm):
    model, tokenizer = vlm
    n = model.tokens_per_image
    return [make_sample(tokenizer, [("What colour is the circle?", "Red.")], 1, 0, n),
            make_sample(tokenizer, [("Compare the two images.", "The first is red, the second blue."),
                                    ("Which is on the left?", "The square.")], 2, 1, n),  # two images, two turns
            make_sample(tokenizer, [("Describe it.", "A green triangle next to a small yellow star.")], 1, 2, n)]


def alone(model, sample):
    """(logits [T, V], loss sum, target count) of one sample run by itself, no mask, no packing."""
    batch = pad_batch([sample], pad_id=0)
    logits, _ = model(batch["input_ids"], batch["pixel_values"])
    total, count = lm_loss(logits, batch["labels"])
    return logits[0], total, count


@pytest.fixture(params=["mm_varlen", "sdpa", "eager"])
def model_with(request, vlm):
    model, tokenizer = vlm
    model = copy.deepcopy(model)
    model.lm.set_attn_implementation(request.param)
    assert model.lm.config._attn_implementation == request.param
    return model


@torch.no_grad()
def test_packed_equals_each_sample_alone(model_with, samples):
    assert len({len(s["input_ids"]) for s in samples}) == 3  # different lengths
    packed = pack_batch(samples)
    assert packed["input_ids"].shape[0] == 1 and packed["pixel_values"].shape[0] == 4
    logits, loss = model_with(packed["input_ids"], packed["pixel_values"], packed["labels"], packed["position_ids"])
    references = [alone(model_with, s) for s in samples]
    for got, (expected, _, _) in zip(unpack(logits, packed["sample_index"]), references):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    total, count = lm_loss(logits, packed["labels"])
    torch.testing.assert_close(total, sum(r[1] for r in references), atol=1e-4, rtol=1e-5)
    assert count == sum(r[2] for r in references)  # no target crosses a sample boundary
    torch.testing.assert_close(loss, total / count)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_loss_at_target_positions_only_equals_the_full_loss_and_its_gradients(vlm, samples, layout):
    """batch_loss runs the output layer only at loss_positions; the loss, its count and every gradient are those of
    the full [B, T, vocab] logits."""
    model = copy.deepcopy(vlm[0]).train()
    batch = pack_batch(samples) if layout == "packed" else pad_batch(samples, pad_id=0)
    keep = loss_positions(batch["labels"])
    n_positions = batch["input_ids"].shape[1] - 1
    assert 0 < len(keep) < n_positions * 0.6  # prompts and images are skipped (padded: the rows' union is kept)

    def loss_and_grads(fn):
        model.zero_grad()
        total, count = fn()
        total.backward()
        return total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = loss_and_grads(lambda: lm_loss(model(batch["input_ids"], batch["pixel_values"], position_ids=batch.get("position_ids"),
                                                attention_mask=batch.get("attention_mask"))[0], batch["labels"]))
    kept = loss_and_grads(lambda: batch_loss(model, batch))
    torch.testing.assert_close(kept[0], full[0], atol=1e-4, rtol=1e-5)
    assert kept[1] == full[1] == sum(sum(t != IGNORE_INDEX for t in s["labels"][1:]) for s in samples)
    assert kept[2].keys() == full[2].keys() and len(full[2]) > 5
    for name in full[2]:
        torch.testing.assert_close(kept[2][name], full[2][name], atol=1e-5, rtol=1e-4, msg=name)
    logits, loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch.get("position_ids"),
                         batch.get("attention_mask"), logits_to_keep=keep)
    assert logits.shape[:2] == (batch["input_ids"].shape[0], len(keep))
    torch.testing.assert_close(loss.detach(), full[0] / full[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep is 0"):
        model(batch["input_ids"], batch["pixel_values"], batch["labels"], batch.get("position_ids"),
              batch.get("attention_mask"), logits_to_keep=3)


def test_a_batch_without_targets_has_zero_loss_and_zero_gradients(vlm, samples):
    model = copy.deepcopy(vlm[0]).train()
    batch = pack_batch(samples)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert len(loss_positions(batch["labels"])) == 0
    total, count = batch_loss(model, batch)
    total.backward()
    assert float(total) == 0.0 and int(count) == 0
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters() if p.grad is not None)


@torch.no_grad()
def test_padded_equals_each_sample_alone(model_with, samples):
    padded = pad_batch(samples, pad_id=0)
    logits, _ = model_with(padded["input_ids"], padded["pixel_values"], attention_mask=padded["attention_mask"])
    total, count = lm_loss(logits, padded["labels"])
    references = [alone(model_with, s) for s in samples]
    for row, s, (expected, _, _) in zip(logits, samples, references):
        torch.testing.assert_close(row[:len(s["input_ids"])], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, sum(r[1] for r in references), atol=1e-4, rtol=1e-5)
    assert count == sum(r[2] for r in references)


@torch.no_grad()
def test_a_mask_or_a_cache_leaks_across_packed_samples_so_the_guard_refuses_them(vlm, samples):
    model, _ = vlm
    packed = pack_batch(samples)
    ids, positions = packed["input_ids"], packed["position_ids"]
    embeds = model.embed(ids, packed["pixel_values"])
    separate = model.lm(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits
    first = len(samples[0]["input_ids"])
    for leaky in ({"attention_mask": torch.ones_like(ids), "use_cache": False}, {"use_cache": True}):
        leaked = model.lm(inputs_embeds=embeds, position_ids=positions, **leaky).logits
        torch.testing.assert_close(leaked[:, :first], separate[:, :first])  # the first sample sees nothing earlier
        assert (leaked[:, first:] - separate[:, first:]).abs().max() > 1e-3  # later ones attend to earlier samples
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(ids, packed["pixel_values"], position_ids=positions, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, packed["pixel_values"], position_ids=positions, use_cache=True)


def test_pack_batch_labels_never_cross_a_boundary(samples):
    packed = pack_batch(samples)
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, len(samples[0]["input_ids"]), len(samples[0]["input_ids"]) + len(samples[1]["input_ids"])]
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert packed["sample_index"][0].tolist() == sum(([k] * len(s["input_ids"]) for k, s in enumerate(samples)), [])


@torch.no_grad()
def test_sequence_logprobs_per_packed_sample_match_alone(vlm, samples):
    model, _ = vlm
    packed = pack_batch(samples)
    logits, _ = model(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
    per_sample = sequence_logprobs(logits, packed["labels"], packed["sample_index"])
    padded = pad_batch(samples, pad_id=0)
    padded_logits, _ = model(padded["input_ids"], padded["pixel_values"], attention_mask=padded["attention_mask"])
    torch.testing.assert_close(per_sample, sequence_logprobs(padded_logits, padded["labels"]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_sample.sum(), -lm_loss(logits, packed["labels"])[0], atol=1e-4, rtol=1e-5)
    assert per_sample.shape == (3,) and (per_sample < 0).all()


def test_image_token_count_must_match_the_images(vlm, samples):
    model, _ = vlm
    packed = pack_batch(samples)
    with pytest.raises(ValueError, match=rf"{4 * model.tokens_per_image} <image> tokens but 3 images x {model.tokens_per_image} tokens per image"):
        model(packed["input_ids"], packed["pixel_values"][:3], position_ids=packed["position_ids"])
    with pytest.raises(ValueError, match="but 0 images"):
        model(packed["input_ids"], None, position_ids=packed["position_ids"])


def test_pixel_shuffle_groups_square_blocks():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid of 1-d tokens numbered row-major
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="square token grid"):
        pixel_shuffle(torch.zeros(1, 6, 2), 2)
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_shuffle(torch.zeros(1, 9, 2), 2)


def test_grid_positions_tell_every_cell_apart_by_row_and_column():
    places = grid_positions(16, 16)  # a 4x4 grid, row-major: x features first (8), then y (8)
    assert places.shape == (16, 16) and len({tuple(row.tolist()) for row in places}) == 16
    torch.testing.assert_close(places[0, 8:], places[3, 8:])  # same row: same y features
    torch.testing.assert_close(places[1, :8], places[13, :8])  # same column: same x features
    assert not torch.allclose(places[0, :8], places[1, :8]) and not torch.allclose(places[0, 8:], places[4, 8:])
    with pytest.raises(ValueError, match="square token grid"):
        grid_positions(12, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_positions(16, 6)


def test_projector_puts_the_place_into_tokens_only_when_asked():
    """Identical tower tokens (a convnet's map carries no place) come out identical without position features and
    distinct with them; the projector's config round-trips."""
    torch.manual_seed(0)
    tokens = torch.ones(2, 16, 8)
    plain, placed = Projector(8, 12), Projector(8, 12, position_dim=16)
    assert torch.allclose(plain(tokens)[0, 0], plain(tokens)[0, 5])
    out = placed(tokens)
    assert out.shape == (2, 16, 12) and len({tuple(t.tolist()) for t in out[0]}) == 16
    assert placed.net[0].in_features == 8 + 16
    assert Projector(**placed.describe()).describe() == placed.describe() == \
        {"in_dim": 8, "out_dim": 12, "pixel_shuffle": 1, "position_dim": 16}
    shuffled = Projector(8, 12, pixel_shuffle=2, position_dim=8)  # the places of the 2x2 grid after the shuffle
    assert shuffled(tokens).shape == (2, 4, 12) and shuffled.net[0].in_features == 8 * 4 + 8


def test_save_and_load_round_trip_without_the_original_files(tmp_path, samples):
    from mm.clip.model import create_clip, export_clip

    torch.manual_seed(5)
    export = export_clip(*(lambda p: (p.model, p.model_cfg))(create_clip("mm-tiny-rn-64")), tmp_path / "clip")
    lm, tokenizer = load_lm("tiny", texts=TEXTS, vocab_size=300, tokenizer_dir=tmp_path / "tok")
    model = build_vlm(load_vision_tower(f"clip:{export}"), lm, tokenizer, position_dim=16).eval()
    out = save_vlm(model, tokenizer, tmp_path / "vlm", extra_config={"recipe": "test"})
    shutil.rmtree(export), shutil.rmtree(tmp_path / "tok")  # the saved folder must stand alone
    assert (out / "vlm_config.json").is_file() and (out / "model.safetensors").is_file()
    loaded, tokenizer2, config = load_vlm(out)
    assert config["tokens_per_image"] == 16 and config["extra"] == {"recipe": "test"} and config["image_size"] == 64
    assert loaded.projector.position_dim == 16
    assert loaded.lm.config.rope_parameters["rope_theta"] == TINY_ROPE_THETA  # not Llama's 10,000
    assert loaded.lm.get_output_embeddings().weight is loaded.lm.get_input_embeddings().weight  # still tied
    packed = pack_batch(samples)
    with torch.no_grad():
        expected, _ = model(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
        got, _ = loaded(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
    assert torch.equal(got, expected)
    assert tokenizer2("<image>")["input_ids"] == tokenizer("<image>")["input_ids"]


def test_lora_trains_only_adapters_and_projector_and_saves_merged(vlm, samples, tmp_path):
    model, tokenizer = vlm
    model = apply_lora(copy.deepcopy(model), r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable) and any("lora_B" in n for n in trainable)
    groups = param_groups(model, lr_lm=1e-4, lr_projector=1e-3, lr_vision=1e-5, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"projector", "projector_no_decay", "lm"}  # LoRA matrices decay
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; make the adapters change the output before merging
    packed = pack_batch(samples)
    model.train()
    _, loss = model(packed["input_ids"], packed["pixel_values"], packed["labels"], packed["position_ids"])
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        expected, _ = model(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
    loaded, _, _ = load_vlm(save_vlm(model, tokenizer, tmp_path / "lora"))
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # saved merged
    with torch.no_grad():
        got, _ = loaded(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the training model keeps its adapters


def test_param_groups_split_parts_and_decay(vlm):
    model, _ = vlm
    model = copy.deepcopy(model)
    model.vision.requires_grad_(True)
    groups = param_groups(model, lr_lm=1e-4, lr_projector=1e-3, lr_vision=1e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["vision"]["lr"] == 1e-5 and by_name["projector"]["lr"] == 1e-3 and by_name["lm"]["lr"] == 1e-4
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith("_no_decay"))
    embedding = model.lm.get_input_embeddings().weight
    assert any(p is embedding for p in by_name["lm_no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    freeze(model.vision)
    assert not any(n.startswith("vision") for n in (g["name"] for g in param_groups(model, 1, 1, 1, 0.1)))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(vlm, samples, lora):
    model, _ = vlm
    packed = pack_batch(samples)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        net = (apply_lora(copy.deepcopy(model), r=4, alpha=8) if lora else copy.deepcopy(model)).train()
        set_gradient_checkpointing(net, enabled)
        assert net.lm.is_activation_checkpointing == enabled
        _, loss = net(packed["input_ids"], packed["pixel_values"], packed["labels"], packed["position_ids"])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_generate_continues_from_the_image_prompt(vlm, samples):
    model, tokenizer = vlm
    sample = samples[0]
    prompt = torch.tensor([sample["input_ids"]])
    logits, _ = model(prompt, sample["pixel_values"])
    new = model.generate(prompt, sample["pixel_values"], max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert new.shape == (1, 3) and new[0, 0] == logits[0, -1].argmax()  # only the continuation comes back


def image_positions_entering(model, layer: int, input_ids, pixel_values) -> torch.Tensor:
    """The hidden states at the <image> positions as `layer` of the LM receives them."""
    from mm.vlm.model import decoder_layers

    seen = []
    handle = decoder_layers(model.lm)[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    try:
        model(input_ids, pixel_values)
    finally:
        handle.remove()
    return seen[0][input_ids == model.image_token_id]


@torch.no_grad()
def test_static_image_tokens_enter_every_layer_as_the_projector_gave_them(vlm, samples):
    model, _ = vlm
    static = copy.deepcopy(model)
    static.set_static_image_tokens(True)
    batch = pad_batch([samples[1]], pad_id=0)  # two images
    projected = static.embed(batch["input_ids"], batch["pixel_values"])[batch["input_ids"] == model.image_token_id]
    got = image_positions_entering(static, 1, batch["input_ids"], batch["pixel_values"])
    assert torch.equal(got, projected)
    moved = image_positions_entering(model, 1, batch["input_ids"], batch["pixel_values"])  # the default: processed
    assert (moved - projected).abs().max() > 1e-2
    # text reads them differently, so the logits differ; and switching it off again restores the model
    assert not torch.allclose(static(batch["input_ids"], batch["pixel_values"])[0],
                              model(batch["input_ids"], batch["pixel_values"])[0])
    static.set_static_image_tokens(False)
    assert torch.equal(static(batch["input_ids"], batch["pixel_values"])[0],
                       model(batch["input_ids"], batch["pixel_values"])[0])


@pytest.fixture
def static_with(model_with):
    model = copy.deepcopy(model_with)
    model.set_static_image_tokens(True)
    return model


@torch.no_grad()
def test_static_image_tokens_keep_packed_samples_apart(static_with, samples):
    packed = pack_batch(samples)
    logits, _ = static_with(packed["input_ids"], packed["pixel_values"], packed["labels"], packed["position_ids"])
    for got, (expected, _, _) in zip(unpack(logits, packed["sample_index"]), [alone(static_with, s) for s in samples]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_static_image_tokens_generate_with_the_cache_as_without(vlm, samples):
    model, tokenizer = vlm
    static = copy.deepcopy(model)
    static.set_static_image_tokens(True)
    sample = samples[1]
    first_target = next(i for i, x in enumerate(sample["labels"]) if x != IGNORE_INDEX)
    prompt = torch.tensor([sample["input_ids"][:first_target]])
    new = static.generate(prompt, sample["pixel_values"], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    # each new token is the argmax of one full forward over the prompt and the tokens before it, no cache
    for k in range(new.shape[1]):
        logits, _ = static(torch.cat([prompt, new[:, :k]], dim=1), sample["pixel_values"])
        assert new[0, k] == logits[0, -1].argmax()
    assert static.image_states.is_image is None  # nothing held after generation


def test_static_image_tokens_survive_gradient_checkpointing_lora_and_save(vlm, samples, tmp_path):
    model, tokenizer = vlm
    packed = pack_batch(samples)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)  # the same LoRA init
        net = apply_lora(copy.deepcopy(model), r=4, alpha=8).train()
        net.set_static_image_tokens(True)
        set_gradient_checkpointing(net, enabled)
        _, loss = net(packed["input_ids"], packed["pixel_values"], packed["labels"], packed["position_ids"])
        loss.backward()  # with checkpointing the layers rerun here, and their hooks with them
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    net.eval()
    out = save_vlm(net, tokenizer, tmp_path / "vlm")
    loaded, _, config = load_vlm(out)
    assert config["static_image_tokens"] is True and loaded.static_image_tokens
    with torch.no_grad():
        expected, _ = net(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
        got, _ = loaded(packed["input_ids"], packed["pixel_values"], position_ids=packed["position_ids"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
