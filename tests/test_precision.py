"""mm/precision.py: fp16's skipped overflow steps are not a NaN stop; a real non-finite loss or gradient is."""
import math

import pytest
import torch

from mm.precision import NonFiniteLossError, check_finite, make_precision, optimizer_step


def setup(name="fp16", init_scale=2.0 ** 16):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    precision = make_precision(name, "cpu")
    if precision.scaler is not None:
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return model, opt, precision


def step(model, opt, precision, x, **kw):
    with precision.autocast():
        out = model(x)
    loss = out.float().square().sum()
    precision.backward(loss)
    return optimizer_step(model.parameters(), opt, precision, grad_clip=1.0, **kw)


def test_auto_is_fp32_on_cpu_and_autocast_only_where_asked():
    assert make_precision("auto", "cpu").name == "fp32"
    model, _, fp16 = setup("fp16")
    with fp16.autocast():
        assert model(torch.ones(1, 4)).dtype == torch.float16
    with make_precision("fp32", "cpu").autocast():
        assert model(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="accepted values are auto, fp32, bf16, fp16"):
        make_precision("fp8", "cpu")


def test_fp16_overflow_is_skipped_not_a_stop():
    """A loss scale so high that the scaled gradients overflow fp32: the scaler skips the update and halves
    its scale; the weights do not move; nothing stops. Then a normal step updates them."""
    model, opt, precision = setup(init_scale=2.0 ** 127)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.full((8, 4), 1e3)
    result = step(model, opt, precision, x)
    assert result.skipped and not math.isfinite(result.grad_norm) and result.scale == 2.0 ** 126
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert precision.skipped_total == 1 and precision.skips_in_a_row == 1
    precision.scaler.update(2.0 ** 8)
    result = step(model, opt, precision, torch.randn(8, 4))
    assert not result.skipped and math.isfinite(result.grad_norm) and precision.skips_in_a_row == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_overflowing_every_step_stops_eventually():
    model, opt, precision = setup(init_scale=2.0 ** 127)
    precision.max_skips = 3
    x = torch.full((8, 4), 1e30)  # overflows at any scale: a diverged run, not a scale to tune
    step(model, opt, precision, x)
    step(model, opt, precision, x)
    with pytest.raises(NonFiniteLossError, match="overflowed on 3 steps in a row"):
        step(model, opt, precision, x, step=7, last_checkpoint="step_6.pt")


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_a_nonfinite_gradient_without_a_scaler_stops_before_the_update(name):
    model, opt, precision = setup(name)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.tensor([[float("nan"), 1.0, 1.0, 1.0]])
    with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 4.*the last good checkpoint is c.pt"):
        step(model, opt, precision, x, step=4, last_checkpoint="c.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_nonfinite_loss_is_a_stop_in_every_precision():
    check_finite(1.5, 3, None)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7.*the last good checkpoint is x.pt"):
        check_finite(float("nan"), 7, "x.pt")
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        check_finite(math.inf, 0, None)
