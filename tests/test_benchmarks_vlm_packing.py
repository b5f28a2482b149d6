"""benchmarks/vlm_packing.py's parts that the GPU run relies on and CPU tests can check: the ~0.5B LM's dims, FLOP
counting through grouped-query attention, and a tiny end-to-end run with --flops. Speed is not checked."""
import json
import math

import pytest
import torch

from tests.helpers import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_half_billion_lm_has_qwen2_0_5b_parameters():
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.vlm_packing import BENCH_LMS

    dims = dict(BENCH_LMS["qwen2-0.5b"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(dims.pop("model_type"), **dims))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2-0.5B's count, tied embeddings


def test_gqa_attention_is_counted_as_the_attention_it_computes():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.vlm_packing import _sdpa_without_gqa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 40, 16, generator=g)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        got = _sdpa_without_gqa(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, expected)
    # QK^T and PV: 2 matmuls of 2 * T * T * D multiply-adds per head, causal or not (torch's convention)
    assert counter.get_total_flops() == 2 * (2 * 8 * 40 * 40 * 16)


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
