"""The optimizer step, right for every precision: autocast around the forward only, backward outside it,
fp16's gradient scaler, gradient clipping, and the guard that stops a run on a non-finite loss or gradient
before the weights change.

    precision = make_precision("auto", device)       # bf16 on a GPU that has it, else fp32
    with precision.autocast():
        loss = loss_fn(model(x))
    precision.backward(loss)                          # outside autocast
    result = optimizer_step(model.parameters(), optimizer, precision, grad_clip=1.0)
    if not result.skipped: scheduler.step()

fp16 overflows now and then by design: the scaler then skips the step and halves its scale. That is
not a failure, and a run only stops if it happens `max_skips` steps in a row. A non-finite loss, or a
non-finite gradient in fp32/bf16 (where no scaler explains it), stops the run (NonFiniteLossError).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or Inf. The last checkpoint on disk is the last good state."""


def check_finite(value: float, step: int, last_checkpoint: str | None, what: str = "loss") -> None:
    """Raise NonFiniteLossError if `value` (the loss, or the gradient norm) is NaN or Inf."""
    if not math.isfinite(value):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} is {value} at step {step}; stopping before the weights are updated ({where}). "
            f"Try a lower lr, more warmup, or grad_clip; resume with --resume=latest.")


@dataclass
class Precision:
    name: str  # fp32, bf16 or fp16
    device_type: str
    scaler: torch.amp.GradScaler | None = None
    max_skips: int = 20  # fp16: overflow-skipped steps in a row before the run stops
    skips_in_a_row: int = field(default=0, init=False)
    skipped_total: int = field(default=0, init=False)

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        """The forward pass's context: autocast to bf16/fp16, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled under fp16. Call it outside `autocast()`."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def make_precision(name: str, device: torch.device | str) -> Precision:
    """auto: bf16 on a GPU that supports it, else fp32. fp16 gets a GradScaler (CPU too, for tests)."""
    device_type = torch.device(device).type
    if name == "auto":
        name = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={name!r}: accepted values are auto, fp32, bf16, fp16")
    scaler = torch.amp.GradScaler(device_type) if name == "fp16" else None
    return Precision(name, device_type, scaler)


@dataclass
class StepResult:
    grad_norm: float  # before clipping, after unscaling; inf/nan on a skipped fp16 step
    skipped: bool  # fp16 overflow: the scaler skipped the update and lowered its scale
    scale: float | None  # the fp16 loss scale after the step


def optimizer_step(params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, precision: Precision,
                   grad_clip: float, step: int = 0, last_checkpoint: str | None = None) -> StepResult:
    """Unscale (fp16), clip, step, zero the gradients. The gradient norm is computed even without clipping
    (max_norm=inf): a NaN/Inf gradient must never reach the weights. Raises NonFiniteLossError for a
    non-finite gradient that no scaler explains, or for `max_skips` fp16 overflows in a row."""
    params = [p for p in params if p.grad is not None]
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if scaler is None:
        check_finite(norm, step, last_checkpoint, what="gradient norm")
        optimizer.step()
        skipped = False
    else:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update when unscale_ found inf/nan
        scaler.update()
        skipped = scaler.get_scale() < before
        precision.skips_in_a_row = precision.skips_in_a_row + 1 if skipped else 0
        precision.skipped_total += skipped
        if precision.skips_in_a_row >= precision.max_skips:
            raise NonFiniteLossError(
                f"fp16: the gradients overflowed on {precision.skips_in_a_row} steps in a row (loss scale now "
                f"{scaler.get_scale():g}) at step {step}; the weights were not updated on those steps "
                f"(the last good checkpoint is {last_checkpoint}). Try precision=bf16 or fp32, or a lower lr.")
    optimizer.zero_grad(set_to_none=True)
    return StepResult(norm, skipped, scaler.get_scale() if scaler is not None else None)
