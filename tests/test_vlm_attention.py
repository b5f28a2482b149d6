"""mm.vlm.attention ("mm_varlen"): packed rows attend sample by sample without a T x T mask and give exactly the
logits, loss and gradients of each sample alone and of transformers' sdpa dense-mask path; padded batches and
generation fall back to sdpa; a model saved with it reloads in a fresh process."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import mm.vlm.attention as varlen
from mm.vlm.lm import load_lm, tiny_lm_config
from mm.vlm.model import build_vlm, lm_loss, pack_batch, pack_rows, pad_batch, save_vlm
from mm.vlm.vision import load_vision_tower
from tests.helpers import ROOT, SUBPROCESS_ENV

VOCAB, LAYERS = 97, 2
LENGTHS = (9, 23, 4, 14)  # different lengths, one very short


def tiny_llama(attn: str, seed: int = 0):
    """The same tiny Llama (GQA: 4 query heads on 2 key/value heads) with the given attention."""
    torch.manual_seed(seed)
    config = tiny_lm_config(VOCAB, hidden=32, layers=LAYERS, heads=4, kv_heads=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a prompt that is not a target
        out.append({"input_ids": ids, "labels": labels, "pixel_values": None})
    return out


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, summed loss, parameter gradients) of one batch: the sum, so that gradients of several batches add."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   attention_mask=batch.get("attention_mask"), use_cache=False).logits
    total, _ = lm_loss(logits, batch["labels"])
    total.backward()
    return logits.detach(), total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_segment_starts_follow_position_restarts():
    assert varlen.segment_starts(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1) == [[0, 3, 5]]
    rows = torch.tensor([[0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1]])  # pack_rows: end pads continue the last sample
    assert varlen.segment_starts(rows, 2) == [[0, 2], [0, 4]]
    assert varlen.segment_starts(torch.arange(5)[None], 3) == [[0]] * 3  # [1, T] position ids broadcast


def test_packed_logits_loss_and_grads_equal_each_sample_alone_and_the_dense_mask(samples):
    model, dense = tiny_llama(varlen.ATTENTION_NAME), tiny_llama("sdpa")
    assert model.config._attn_implementation == "mm_varlen"
    packed = pack_batch(samples)
    logits, total, grads = loss_and_grads(model, packed)
    dense_logits, dense_total, dense_grads = loss_and_grads(dense, packed)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, dense_total, atol=1e-5, rtol=1e-5)
    alone = [loss_and_grads(model, pad_batch([s], pad_id=0)) for s in samples]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for (one_logits, _, _), start, end in zip(alone, starts, starts[1:]):
        torch.testing.assert_close(logits[0, start:end], one_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, sum(a[1] for a in alone), atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(grad, sum(a[2][name] for a in alone), atol=1e-5, rtol=1e-5, msg=name)
    assert grads["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


@torch.no_grad()
def test_rows_with_end_pads_and_padded_batches_match_sdpa(samples):
    model, dense = tiny_llama(varlen.ATTENTION_NAME), tiny_llama("sdpa")
    rows = pack_rows(samples, row_tokens=30, pad_id=0)  # several rows, several samples in some, pads at the ends
    assert rows["input_ids"].shape[0] > 1
    for batch in (rows, pad_batch(samples, pad_id=0)):
        kwargs = {"position_ids": batch.get("position_ids"), "attention_mask": batch.get("attention_mask"),
                  "use_cache": False}
        got, want = model(batch["input_ids"], **kwargs).logits, dense(batch["input_ids"], **kwargs).logits
        real = batch["labels"] != -100  # where padded rows' logits mean something
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_grads_of_several_packed_rows_equal_the_dense_mask(samples):
    """The backward through rows of different sample boundaries (each row split on its own), not only one row."""
    model, dense = tiny_llama(varlen.ATTENTION_NAME), tiny_llama("sdpa")
    rows = pack_rows(samples, row_tokens=30, pad_id=0)
    assert rows["input_ids"].shape[0] > 1
    _, total, grads = loss_and_grads(model, rows)
    _, dense_total, dense_grads = loss_and_grads(dense, rows)
    torch.testing.assert_close(total, dense_total, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


@torch.no_grad()
def test_sample_boundaries_are_found_once_per_forward_not_per_layer(samples, monkeypatch):
    found, original = [], varlen.segment_starts
    monkeypatch.setattr(varlen, "segment_starts", lambda p, b: found.append(p) or original(p, b))
    model = tiny_llama(varlen.ATTENTION_NAME)
    packed = pack_batch(samples)
    want = model(packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert len(found) == 1 and LAYERS > 1  # every layer got the same position ids: found once
    other = pack_batch(samples[::-1])  # a new tensor with other boundaries is looked at again
    model(other["input_ids"], position_ids=other["position_ids"], use_cache=False)
    assert len(found) == 2
    positions = packed["position_ids"].clone()
    model(packed["input_ids"], position_ids=positions, use_cache=False)
    positions[0, LENGTHS[0]] = LENGTHS[0]  # changed in place: samples 0 and 1 joined, so not the cached answer
    joined = model(packed["input_ids"], position_ids=positions, use_cache=False).logits
    assert len(found) == 4
    assert not torch.allclose(joined, want, atol=1e-4)
    with torch.inference_mode():  # inference tensors have no version counter: not cached, still right
        got = model(packed["input_ids"], position_ids=packed["position_ids"].clone(), use_cache=False).logits
    torch.testing.assert_close(got, want)
    assert len(found) == 4 + LAYERS


@pytest.fixture
def calls(monkeypatch) -> dict:
    """Counts of mm_varlen's per-segment path, its sdpa fallback and transformers' sdpa mask builder."""
    counts = {"segments": 0, "fallback": 0, "mask": 0}

    def spy(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(varlen, "attend_segments", spy("segments", varlen.attend_segments))
    monkeypatch.setattr(varlen, "sdpa_attention_forward", spy("fallback", varlen.sdpa_attention_forward))
    monkeypatch.setattr(varlen, "sdpa_mask", spy("mask", varlen.sdpa_mask))
    return counts


@torch.no_grad()
def test_packed_batches_take_the_per_segment_path_and_build_no_mask(samples, calls):
    model = tiny_llama(varlen.ATTENTION_NAME)
    packed = pack_batch(samples)
    model(packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
    assert calls == {"segments": LAYERS, "fallback": 0, "mask": 0}
    padded = pad_batch(samples, pad_id=0)
    model(padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)
    assert calls == {"segments": LAYERS, "fallback": LAYERS, "mask": 1}  # one mask for all layers


@torch.no_grad()
def test_generation_falls_back_and_matches_sdpa(calls):
    model, dense = tiny_llama(varlen.ATTENTION_NAME).eval(), tiny_llama("sdpa").eval()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # left padded, as VisionChat batches prompts
    mask = (prompts != 0).long()
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
              "output_logits": True, "return_dict_in_generate": True}
    got, want = model.generate(prompts, **kwargs), dense.generate(prompts, **kwargs)
    assert got.sequences.shape == (2, 11)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=1e-5)
    assert calls["fallback"] == LAYERS * 6 and calls["segments"] == 0  # prefill has padding, then cache steps


def test_what_it_cannot_keep_apart_is_refused():
    class Windowed(torch.nn.Module):
        sliding_window = 16
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        varlen.varlen_attention_forward(Windowed(), q, q, q, None, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="needs the position ids"):  # no mask was built: they are all there is
        varlen.varlen_attention_forward(torch.nn.Module(), q, q, q, None)


def test_a_saved_model_reloads_with_mm_varlen_in_a_fresh_process(tmp_path, samples):
    torch.manual_seed(0)
    texts = ["What colour is the circle?", "It is red.", "Describe the image."] * 4
    lm, tokenizer = load_lm("tiny", attn_implementation="mm_varlen", texts=texts, vocab_size=300,
                            tokenizer_dir=tmp_path / "tok")
    model = build_vlm(load_vision_tower("open_clip:mm-tiny-rn-32", image_size=32), lm, tokenizer).eval()
    save_vlm(model, tokenizer, tmp_path / "saved")
    ids = [s["input_ids"].clamp(max=len(tokenizer) - 2) for s in samples]
    packed = pack_batch([{"input_ids": i, "labels": i} for i in ids])
    with torch.no_grad():
        expected = model(packed["input_ids"], position_ids=packed["position_ids"])[0]
    torch.save({"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}, tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "from mm.vlm.model import load_vlm\n"  # nothing else imports mm.vlm.attention first
        "model, _, config = load_vlm(sys.argv[1])\n"
        "batch = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    logits = model(batch['input_ids'], position_ids=batch['position_ids'])[0]\n"
        "torch.save(logits, sys.argv[3])\n"
        "print(model.lm.config._attn_implementation, config['lm']['attn_implementation'])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path / "batch.pt"),
                           str(tmp_path / "logits.pt")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["mm_varlen", "mm_varlen"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5, rtol=1e-5)
