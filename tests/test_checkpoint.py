import math
import random

import pytest
import torch

from mm import checkpoint as ckpt
from mm.metrics import MetricsLogger, NonFiniteLossError, check_finite, read_metrics
from mm.optim import WarmupCosine, decays, param_groups


def test_save_keeps_last_k_and_latest_resolves(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000040.pt"
    assert ckpt.load_checkpoint(ckpt.resolve_resume("latest", tmp_path))["step"] == 40
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_failed_write_leaves_previous_file_intact(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": 1}, keep=0)

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(tmp_path / "step_00000001.pt", boom)
    assert ckpt.load_checkpoint(tmp_path / "step_00000001.pt") == {"w": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]


def test_resume_errors_are_clear(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no step_"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)


def test_rng_round_trip():
    state = ckpt.capture_rng()
    a = (random.random(), torch.rand(3))
    ckpt.restore_rng(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_safetensors_export_round_trip(tmp_path):
    lin = torch.nn.Linear(3, 2)
    ckpt.export_safetensors(lin.state_dict(), tmp_path / "w.safetensors", {"dims": {"in": 3, "out": 2}})
    sd, meta = ckpt.read_safetensors(tmp_path / "w.safetensors")
    assert meta == {"dims": {"in": 3, "out": 2}}
    torch.testing.assert_close(sd["weight"], lin.weight.detach())


def test_nonfinite_loss_stops_with_a_message():
    check_finite(1.5, 3, None)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7.*the last good checkpoint is x.pt"):
        check_finite(float("nan"), 7, "x.pt")
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf"):
        check_finite(math.inf, 7, None, what="gradient norm")


def test_metrics_logger_appends_jsonl(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=True)
    m.log(1, {"loss": 2.0})
    m.log(2, {"loss": 1.0, "note": "x"})
    m.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.0)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_no_weight_decay_on_norms_biases_embeddings_and_scale():
    from mm.clip.model import create_clip
    model = create_clip("mm-test-micro")[0]
    no_decay = {n for n, p in model.named_parameters() if not decays(n, p)}
    assert "logit_scale" in no_decay and "token_embedding.weight" in no_decay and "positional_embedding" in no_decay
    assert "visual.class_embedding" in no_decay and "ln_final.weight" in no_decay and "ln_final.bias" in no_decay
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in no_decay
    groups = param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 120))
