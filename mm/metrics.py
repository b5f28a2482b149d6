"""Run logging: metrics.jsonl (always), TensorBoard (when installed), wandb (when installed and asked for).
A resumed run continues the same files with one row per step: rows past the resumed step (trained again)
are dropped first. (The NaN/Inf guard is in mm/precision.py.)"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mm")


def setup_logging(is_main: bool = True) -> None:
    """Readable log lines on stderr from the main process; warnings only from the others."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


class MetricsLogger:
    """Appends one JSON object per call to <out_dir>/metrics.jsonl and mirrors scalars to TensorBoard/wandb."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard drops the events past it that an earlier (killed) run wrote
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
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
        append_jsonl(self.path, {"step": step, "time": round(time.time(), 3), **metrics})
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


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """One JSON object as one line at the end of `path`."""
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Drop the rows of a JSONL log whose "step" is past `step` (a resumed run trains those steps again),
    rewriting the file atomically. Returns the number of rows dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)
