"""Classify images against labels you type, with a CLIP checkpoint; or score it on a labelled folder.

    python -m mm.zeroshot photos/ cat.jpg --labels "cat,dog,car"            # JSON on stdout
    python -m mm.zeroshot photos/ --labels-file labels.txt --format table --top-k 3
    python -m mm.zeroshot --eval-folder val/ --confusion-png confusion.png  # one subfolder per class
    python -m mm.zeroshot img.png --labels "cat,dog" --model ViT-B-32 --weights vit_b32.pt

The model comes from --checkpoint (default runs/clip, what recipes/clip/train.py writes) or
--model + --weights. Exit status: 0 ok; non-zero, with a message on stderr, for bad input
(2) or a missing model (1).
"""
from __future__ import annotations

import argparse
import json
import sys

from mm.zeroshot.args import add_model_args, load_classifier
from mm.zeroshot.inputs import check_templates, find_images, parse_labels, read_lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mm.zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--labels", help='labels, comma-separated ("cat,dog") or a JSON list')
    p.add_argument("--labels-file", help="text file with one label per line")
    p.add_argument("--templates-file", help="text file with one prompt template per line, "
                   "each with one '{}' where the label goes ('{{' and '}}' for literal braces)")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image (default: %(default)s)")
    p.add_argument("--format", choices=("json", "table"), default="json", help="output format (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--eval-folder", help="score on a folder with one subfolder of images per class")
    p.add_argument("--confusion-png", help="with --eval-folder: save the confusion matrix here")
    add_model_args(p)
    return p


def read_labels(args) -> list[str] | None:
    """Labels from --labels and/or --labels-file (None when neither is given)."""
    if args.labels is None and args.labels_file is None:
        return None
    labels = parse_labels(args.labels or "")
    if args.labels_file:
        labels = parse_labels(labels + read_lines(args.labels_file))
    return labels


def format_table(rows: list[dict]) -> str:
    """One line per image: path, then label (probability) pairs, best first."""
    width = max(len(r["image"]) for r in rows)
    return "\n".join(f"{r['image']:<{width}}  " + "  ".join(f"{p['label']} ({p['probability']:.3f})"
                                                          for p in r["predictions"]) for r in rows)


def format_eval_table(result: dict) -> str:
    lines = [f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n {result['n']}"]
    for label, stats in result["per_class"].items():
        acc = "-" if stats["top1"] is None else f"{stats['top1']:.3f}"
        lines.append(f"  {label:<30} top-1 {acc}  n {stats['n']}")
    if result.get("confusion_png"):
        lines.append(f"confusion matrix: {result['confusion_png']}")
    return "\n".join(lines)


def run(args) -> str:
    """The output text for parsed `args`; raises ValueError/FileNotFoundError on bad input."""
    labels = read_labels(args)
    templates = read_lines(args.templates_file) if args.templates_file else None
    if templates is not None:  # before the model loads: a bad template is the user's to fix, in seconds
        check_templates(templates, labels or ())
    if args.eval_folder:
        clf = load_classifier(args)
        result = clf.evaluate_folder(args.eval_folder, labels, templates, args.confusion_png, args.batch_size)
        return format_eval_table(result) if args.format == "table" else json.dumps(result, indent=1)
    if not args.inputs:
        raise ValueError("no images given: pass image files or folders (or --eval-folder DIR)")
    if not labels:
        raise ValueError("no labels given: pass --labels 'cat,dog' or --labels-file FILE")
    paths = find_images(args.inputs)
    if not paths:
        raise ValueError(f"no image files found in {', '.join(args.inputs)}")
    clf = load_classifier(args)
    ranked = clf.classify(paths, labels, templates, args.top_k, args.batch_size)
    rows = [{"image": str(p), "predictions": [{"label": lab, "probability": prob} for lab, prob in r]}
            for p, r in zip(paths, ranked)]
    return format_table(rows) if args.format == "table" else json.dumps(rows, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.confusion_png and not args.eval_folder:
        parser.error("--confusion-png needs --eval-folder")
    try:
        print(run(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
