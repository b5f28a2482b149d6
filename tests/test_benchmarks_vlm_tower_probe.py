"""benchmarks/vlm_tower_probe.py: the linear probe tells attributes that compose from attributes entangled with
each other, and the program runs end to end on a tiny tower."""
import pytest
import torch

from tests.helpers import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(pairs, code):
    x = torch.stack([code(c, s) for c, s in pairs])
    return x + 0.01 * torch.randn(x.shape), torch.tensor([c for c, _ in pairs]), torch.tensor([s for _, s in pairs])


def test_the_probe_reads_a_held_out_pair_only_when_the_features_compose():
    from benchmarks.vlm_tower_probe import linear_probe

    torch.manual_seed(0)
    held_out = [(i, (i + 1) % 6) for i in range(6)]  # one per colour and one per shape, as the data's
    seen = [(c, s) for c in range(6) for s in range(6) if (c, s) not in held_out] * 4
    composed = lambda c, s: torch.cat([torch.eye(6)[c], torch.eye(6)[s]])  # noqa: E731 - colour and shape apart
    entangled = lambda c, s: torch.eye(36)[6 * c + s]  # noqa: E731 - one direction per pair
    held_out_scores = {}
    for name, code in (("composed", composed), ("entangled", entangled)):
        x_train, colour_train, shape_train = _features(seen, code)
        x_test, colour_test, shape_test = _features(held_out * 4, code)
        for y_train, y_test in ((colour_train, colour_test), (shape_train, shape_test)):
            on_train, on_held_out = linear_probe(x_train, y_train, x_test, y_test, classes=6)
            assert on_train == 1.0
            held_out_scores.setdefault(name, []).append(on_held_out)
    assert held_out_scores["composed"] == [1.0, 1.0]
    # a held-out pair's own direction was never trained: what the probe says of it is a guess
    assert sum(held_out_scores["entangled"]) / 2 <= 0.5


def test_it_runs_on_a_tiny_tower_and_reports_both_attributes(capsys):
    from benchmarks.vlm_tower_probe import main

    result = main(["--vision=open_clip:mm-tiny-rn-32", "--train=60", "--test=30"])
    assert result["tokens"] == 16 and (result["train_scenes"], result["test_scenes"]) == (60, 30)
    for name in ("colour", "shape"):
        assert result[name]["training_pairs"] >= 0.9  # 60 scenes, 256 features: separable
        assert 0.0 <= result[name]["held_out_pairs"] <= 1.0
    assert "on the held-out pairs" in capsys.readouterr().out
