"""The model options the zero-shot CLI, HTTP server and demo share, and loading a classifier from them."""
from __future__ import annotations

import argparse
from pathlib import Path

from mm.cli import add_device_argument

DEFAULT_CHECKPOINT = "runs/clip"  # recipes/clip/train.py's default out_dir
TRAIN_HINT = ("Train one with `python recipes/clip/train.py` (writes runs/clip), or pass --checkpoint PATH "
              "(a run folder, its export/ folder or a step_*.pt file), or --model NAME --weights FILE.")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, or --model with --weights; and --device."""
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="run folder, export folder or step_*.pt written by recipes/clip/train.py (default: %(default)s)")
    g.add_argument("--model", help="open_clip model name or .json config instead of --checkpoint (needs --weights)")
    g.add_argument("--weights", help="local open_clip weights file for --model")
    add_device_argument(g)


def load_classifier(args: argparse.Namespace, **kwargs):
    """A ZeroShotClassifier from parsed model args; SystemExit with a how-to message if there is no model."""
    use_weights = bool(args.model or args.weights)
    if use_weights and not (args.model and args.weights):
        raise SystemExit("error: --model and --weights go together (an architecture and its weights file)")
    if not use_weights and not Path(args.checkpoint).exists():
        raise SystemExit(f"error: no CLIP checkpoint at {args.checkpoint}. {TRAIN_HINT}")
    from mm.checkpoint import CheckpointError  # here: a missing model is reported before torch loads
    from mm.zeroshot.classifier import ZeroShotClassifier

    try:
        if use_weights:
            return ZeroShotClassifier.from_pretrained(args.model, args.weights, args.device, **kwargs)
        return ZeroShotClassifier.from_checkpoint(args.checkpoint, args.device, **kwargs)
    except CheckpointError as e:  # the file exists but is refused or broken: training another is not the fix
        raise SystemExit(f"error: {e}")
    except (FileNotFoundError, ValueError) as e:
        hint = "" if use_weights or "recipes/clip/train.py" in str(e) else f"\n{TRAIN_HINT}"
        raise SystemExit(f"error: {e}{hint}")
