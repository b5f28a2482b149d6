"""Run logging: metrics.jsonl (always), TensorBoard (when installed), wandb (when installed and asked
for), and the loss guard that stops a run on NaN/Inf before it can overwrite a good checkpoint."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mm")


def setup_logging(is_main: bool = True) -> None:
    """Readable log lines on stderr from the main process; warnings only from the others."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf. The last checkpoint on disk is the last good state."""


def check_finite(value: float, step: int, last_checkpoint: str | None, what: str = "loss") -> None:
    """Raise NonFiniteLossError if `value` (the loss, or the gradient norm) is NaN or Inf."""
    if not math.isfinite(value):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} is {value} at step {step}; stopping before the weights are updated ({where}). "
            f"Try a lower lr, more warmup, or grad_clip; resume with --resume=latest.")


class MetricsLogger:
    """Appends one JSON object per call to <out_dir>/metrics.jsonl and mirrors scalars to TensorBoard/wandb."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed; logging to metrics.jsonl only")
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir), resume="allow")
            except ImportError:
                log.warning("wandb_project=%s but wandb is not installed (pip install wandb); skipping wandb", wandb_project)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
