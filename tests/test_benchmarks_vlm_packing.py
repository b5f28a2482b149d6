"""benchmarks/vlm_packing.py's parts that the GPU run relies on and CPU tests can check: the ~0.5B LM's dims, FLOP
counting through grouped-query attention, and a tiny end-to-end run with --flops. Speed is not checked."""
import json
import math

import pytest
import torch

from tests.helpers import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REAL_SDPA = torch.nn.functional.scaled_dot_product_attention  # count_flops patches the module's name


def test_the_half_billion_lm_has_qwen2_0_5b_parameters():
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.vlm_packing import BENCH_LMS

    dims = dict(BENCH_LMS["qwen2-0.5b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(dims.pop("model_type"), **dims))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2-0.5B's count, tied embeddings


def test_gqa_attention_reaches_sdpa_with_as_many_key_as_query_heads():
    """What FlopCounterMode's SDPA formula needs on torch 2.11 (the GPU machine's): the same result, equal heads."""
    from unittest import mock

    import benchmarks.vlm_packing as bench

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 40, 16, generator=g)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    seen = []

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.shape[-3], key.shape[-3], value.shape[-3], kwargs.get("enable_gqa", False)))
        return REAL_SDPA(query, key, value, *args, **kwargs)

    with mock.patch.object(bench, "_SDPA", spy):
        got = bench._sdpa_without_gqa(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, expected)
    assert seen == [(8, 8, 8, False)]


def test_counting_sees_every_layer_and_segment_with_equal_heads(tmp_path):
    """count_flops on a GQA LM (2 KV heads for 4) with mm_varlen: each layer's attention of each packed sample goes
    through the head-expanding SDPA, one call per sample and layer, with as many key as query heads."""
    from unittest import mock

    import benchmarks.vlm_packing as bench
    from mm.vlm.lm import load_lm
    from mm.vlm.model import build_vlm
    from mm.vlm.vision import load_vision_tower

    torch.manual_seed(0)
    lm, tokenizer = load_lm("tiny", texts=["a red star", "a blue square"], vocab_size=300, tokenizer_dir=tmp_path)
    model = build_vlm(load_vision_tower("open_clip:mm-tiny-rn-32", image_size=64), lm, tokenizer)
    model.lm.set_attn_implementation("mm_varlen")  # the packed side's, whose steps count_flops counts
    lengths = (30, 20)
    group = [{"input_ids": torch.randint(10, 200, (n,)), "labels": torch.randint(10, 200, (n,)),
              "pixel_values": None} for n in lengths]
    seen = []

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.shape[-3], key.shape[-3], query.shape[-2]))
        return REAL_SDPA(query, key, value, *args, **kwargs)

    with mock.patch.object(bench, "_SDPA", spy):
        bench.count_flops(model, [group], torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), False)
    layers, heads = lm.config.num_hidden_layers, lm.config.num_attention_heads
    assert sorted(seen) == sorted([(heads, heads, n) for n in lengths] * layers)


def test_a_tiny_run_reports_flops_and_mfu(tmp_path):
    from benchmarks.vlm_packing import main
    from data_tools.synthetic_vlm import ensure_synthetic_vlm

    data = tmp_path / "data"
    ensure_synthetic_vlm(data, train=40, align=8, heldout=8, prefs=4)
    res = main(["--data", str(data), "--samples=24", "--lm_size=tiny", "--batch_tokens=512", "--flops",
                "--loss=targets", "--warmup=1", "--peak_tflops=1", "--out", str(tmp_path / "out")])
    per_token = res["train_flops_per_real_token"]
    # forward + backward is at least 6 FLOPs per LM weight per token (the image tower and attention come on top)
    assert per_token > 6 * res["lm_params_M"] * 1e6 * 0.5
    for side in ("varlen", "dense", "padded"):
        assert res[side]["tflops"] == pytest.approx(per_token * res[side]["tokens_per_s"] / 1e12)
        assert res[side]["mfu"] == pytest.approx(res[side]["tflops"])  # --peak_tflops=1
        assert math.isfinite(res[side]["heldout_loss"])
    saved = json.loads((tmp_path / "out" / "results_qa.json").read_text())
    assert saved["loss"] == "targets" and saved["train_flops_per_real_token"] == per_token
