"""benchmarks/vlm_tower_probe.py: the linear probe tells attributes that compose from attributes entangled with
each other, and the program runs end to end on a tiny tower."""
import pytest
import torch

from tests.helpers import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(pairs: list[tuple[int, int]], code) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.stack([code(c, s) for c, s in pairs])
    return x + 0.01 * torch.randn(x.shape), torch.tensor([c for c, _ in pairs]), torch.tensor([s for _, s in pairs])


def _composed(colour: int, shape: int) -> torch.Tensor:
    return torch.cat([torch.eye(6)[colour], torch.eye(6)[shape]])  # colour and shape in dimensions of their own


def _entangled(colour: int, shape: int) -> torch.Tensor:
    return torch.eye(36)[6 * colour + shape]  # one dimension per pair


def test_the_probe_reads_a_held_out_pair_only_when_the_features_compose():
    from benchmarks.vlm_tower_probe import linear_probe

    held_out = [(i, (i + 1) % 6) for i in range(6)]  # one per colour and one per shape, as the data's
    seen = [(c, s) for c in range(6) for s in range(6) if (c, s) not in held_out] * 4
    held_out_scores = {"composed": [], "entangled": []}
    for seed in range(5):
        torch.manual_seed(seed)
        for name, code in (("composed", _composed), ("entangled", _entangled)):
            x_train, colour_train, shape_train = _features(seen, code)
            x_test, colour_test, shape_test = _features(held_out * 4, code)
            for y_train, y_test in ((colour_train, colour_test), (shape_train, shape_test)):
                on_train, on_held_out = linear_probe(x_train, y_train, x_test, y_test, classes=6)
                assert on_train == 1.0
                held_out_scores[name].append(on_held_out)
    assert held_out_scores["composed"] == [1.0] * 10
    # a held-out pair's own dimension was never trained: what the probe says of it is a guess (chance: 1/6)
    assert sum(held_out_scores["entangled"]) / 10 <= 0.4


def test_it_runs_on_a_tiny_tower_and_reports_both_attributes(capsys):
    from benchmarks.vlm_tower_probe import main

    result = main(["--vision=open_clip:mm-tiny-rn-32", "--train=60", "--test=30"])
    assert result["tokens"] == 16 and (result["train_scenes"], result["test_scenes"]) == (60, 30)
    for name in ("colour", "shape"):
        assert result[name]["training_pairs"] >= 0.9  # 60 scenes, 256 features: separable
    assert "on the held-out pairs" in capsys.readouterr().out
