"""Probe: can a vision tower's tokens say a colour-shape pair's colour and shape when that pair was never seen?

    python benchmarks/vlm_tower_probe.py                                  # the CLIP default run's export, as the recipe uses it
    python benchmarks/vlm_tower_probe.py --layer=-3 --image_size=96      # another stage, a larger grid
    python benchmarks/vlm_tower_probe.py --vision=open_clip:mm-tiny-rn-32 --train=60 --test=30   # smoke (the test)

The vision-chat default run scores 0.9+ on held-out questions about colour-shape pairs seen in training and far less
on the 6 pairs held out (data_tools/synthetic_vlm.reserved_pairs). This asks how much of that the frozen tower
already decides: one-object scenes (the data's own make_scene / render_scene) of the 30 training pairs, the tower's
tokens mean-pooled, standardised, and a linear classifier (softmax regression, full-batch Adam) per attribute
trained on them; then scored on scenes of the 6 held-out pairs. A score near 1.0 on the training pairs and far less
on the held-out ones means the attribute is there, entangled with the other one. The mean is a linear probe's;
max pooling gave the same picture.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.synthetic_clip import COLOURS, SHAPES  # noqa: E402
from data_tools.synthetic_vlm import all_pairs, make_scene, render_scene, reserved_pairs  # noqa: E402
from mm.vlm.vision import VisionTower, image_transform, load_vision_tower  # noqa: E402


def tower_features(tower: VisionTower, pairs: list[tuple[str, str]], n: int, rng: random.Random,
                   image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n one-object scenes of pairs drawn at random: (pooled tokens [n, d], colour index [n], shape index [n])."""
    transform, images, colours, shapes = image_transform(tower, train=False), [], [], []
    colour_index = {name: i for i, name in enumerate(COLOURS)}
    for _ in range(n):
        pair = rng.choice(pairs)
        images.append(transform(render_scene(make_scene(rng, [pair], 1, include=pair), image_size, rng)))
        colours.append(colour_index[pair[0]])
        shapes.append(SHAPES.index(pair[1]))
    with torch.no_grad():
        tokens = torch.cat([tower(torch.stack(images[i:i + 64])) for i in range(0, n, 64)])
    return tokens.mean(1), torch.tensor(colours), torch.tensor(shapes)


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 classes: int, steps: int = 300) -> tuple[float, float]:
    """Softmax regression on standardised features: (accuracy on the training set, on the test set)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return ((head(x_train).argmax(1) == y_train).float().mean().item(),
                (head(x_test).argmax(1) == y_test).float().mean().item())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="clip:runs/clip", help="a tower spec, as the recipe's --vision takes it")
    p.add_argument("--layer", type=int, default=-2, help="which block's tokens (the recipe's --vision_layer)")
    p.add_argument("--image_size", type=int, default=64, help="the recipe's --image_size")
    p.add_argument("--train", type=int, default=1500, help="scenes of the training pairs")
    p.add_argument("--test", type=int, default=300, help="scenes of the held-out pairs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    tower = load_vision_tower(a.vision, layer=a.layer, image_size=a.image_size).eval()
    held_out = reserved_pairs()
    seen = [pair for pair in all_pairs() if pair not in held_out]
    rng = random.Random(a.seed)
    x_train, colour_train, shape_train = tower_features(tower, seen, a.train, rng, a.image_size)
    x_test, colour_test, shape_test = tower_features(tower, held_out, a.test, rng, a.image_size)
    result = {"vision": a.vision, "layer": a.layer, "image_size": a.image_size, "tokens": tower.num_tokens,
              "train_scenes": a.train, "test_scenes": a.test}
    for name, y_train, y_test, classes in (("colour", colour_train, colour_test, len(COLOURS)),
                                           ("shape", shape_train, shape_test, len(SHAPES))):
        seen_acc, novel_acc = linear_probe(x_train, y_train, x_test, y_test, classes)
        result[name] = {"training_pairs": round(seen_acc, 3), "held_out_pairs": round(novel_acc, 3)}
        print(f"{name}: {seen_acc:.3f} on the training pairs, {novel_acc:.3f} on the held-out pairs "
              f"(chance {1 / classes:.3f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
