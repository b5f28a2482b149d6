"""mm.vlm.auto: the cookbook's epoch rule, our batch size and lr multiplier rules, exact numbers and clamps; the
recipe's schedule built from them (steps counted in the examples a step really takes), and its log of why."""
import math

import pytest

from mm.vlm.auto import auto_batch_size, auto_epochs, auto_lr_multiplier, steps_for
from tests.helpers import ROOT, load_recipe
from tests.vlm_fixtures import trained_vlm  # noqa: F401 - a fixture

PRESETS = ROOT / "recipes" / "vlm" / "configs"


COOKBOOK = [
    (1, 25), (3, 25), (4, 25),  # 100 // n clamped to 25
    (5, 20), (10, 10), (20, 5), (30, 3), (33, 3),  # n x 3 < 100: raised to 100 // n
    (34, 3), (50, 3), (1000, 3), (8333, 3),  # n x 3 within 100-25,000: the default 3
    (8334, 2), (12_500, 2), (12_501, 1), (1_000_000, 1),  # n x 3 > 25,000: 25,000 // n, at least 1
]


@pytest.mark.parametrize("n, epochs", COOKBOOK)
def test_epochs_follow_the_cookbook_rule(n, epochs):
    choice = auto_epochs(n)
    assert choice.value == epochs
    assert choice.reason.startswith(f"{epochs} epochs: {n} examples x 3 epochs")


@pytest.mark.parametrize("n, epochs", [
    (1, 25), (4, 25), (5, 20), (12, 8),  # n x 8 < 100: raised to 100 // n, at most 25
    (13, 8), (8000, 8),  # n x 8 within 100-64,000: 8 (8,000, the built-in data, at the top)
    (8001, 7), (30_000, 2), (64_001, 1),  # n x 8 > 64,000: 64,000 // n, at least 1
])
def test_epochs_for_an_lm_from_scratch_follow_the_rule_aiming_higher(n, epochs):
    choice = auto_epochs(n, from_scratch=True)
    assert choice.value == epochs
    assert choice.reason.startswith(f"{epochs} epochs: {n} examples x 8 epochs")
    assert choice.reason.endswith("(an LM from scratch: the cookbook's rule, aiming higher)")
    assert auto_epochs(8000).value == 3  # a pretrained LM on the built-in data: the cookbook's rule as it is


def test_epochs_reasons_say_which_way_and_no_examples_is_an_error():
    assert "< 100: raised" in auto_epochs(10).reason
    assert "is within 100-25,000" in auto_epochs(50).reason
    assert "> 25,000: lowered" in auto_epochs(10_000).reason
    with pytest.raises(ValueError, match="no training examples"):
        auto_epochs(0)


@pytest.mark.parametrize("n, size", [
    (1, 1), (60, 1), (749, 1), (750, 2), (1000, 2), (5000, 10), (64_000, 128), (128_000, 256), (10**7, 256)])
def test_batch_size_is_a_fifth_of_a_percent_within_1_to_256(n, size):
    choice = auto_batch_size(n)
    assert choice.value == size and choice.reason == f"batch of {size}: 0.2% of {n} examples, within 1-256"


@pytest.mark.parametrize("batch, mult", [(1, 2.0), (8, 2.0), (9, 1.0), (64, 1.0), (65, 0.5), (256, 0.5)])
def test_lr_multiplier_falls_with_the_batch(batch, mult):
    choice = auto_lr_multiplier(batch)
    assert choice.value == mult and choice.reason == f"lr multiplier {mult:g}: batches of {batch} examples"


@pytest.mark.parametrize("n, epochs, batch, steps", [
    (60, 3, 1, 180), (10, 10, 4, 25), (10, 3, 4, 8), (1, 1, 256, 1), (60, 3, 2.5, 72)])
def test_steps_for_shows_every_example_epochs_times(n, epochs, batch, steps):
    assert steps_for(n, epochs, batch) == steps


# ---------------------------------------------------------------- the recipe's schedule

def schedule(*args, n_examples: int, mean_tokens: float) -> dict:
    from mm.config import parse_config

    recipe = load_recipe("vlm")
    return recipe.choose_schedule(parse_config(recipe.VLMConfig, list(args), PRESETS), n_examples, mean_tokens)


def test_schedule_of_a_small_set_counts_the_examples_a_pack_holds():
    """60 examples of ~110 tokens: auto gives 8 epochs (a tiny LM from scratch) of batch 1, but a pack is at least
    --max_tokens=256 long, so a step takes 256/110 examples; the steps are those of 8 epochs at that rate, not 480."""
    got = schedule("--config=tiny", "--n_epochs=auto", "--batch_size=auto", "--lr_multiplier=auto", "--max_steps=0",
                   n_examples=60, mean_tokens=110.0)
    assert {k: got[k] for k in ("n_epochs", "batch_size", "lr_multiplier", "grad_accum", "pack_tokens")} == \
        {"n_epochs": 8, "batch_size": 1, "lr_multiplier": 2.0, "grad_accum": 1, "pack_tokens": 256}
    assert got["max_steps"] == math.ceil(60 * 8 / (256 / 110)) == 207


def test_schedule_of_a_large_set_accumulates_packs_to_the_batch():
    """5,000 examples of 600 tokens: batch 10 = 6,000 tokens = 3 packs of 2,000 (under --pack_tokens=2048). A
    pretrained LM (a folder) gets the cookbook's 3 epochs."""
    got = schedule("--n_epochs=auto", "--batch_size=auto", "--lr_multiplier=auto", "--lm=some/hf/folder",
                   n_examples=5000, mean_tokens=600.0)
    assert {k: got[k] for k in ("n_epochs", "batch_size", "lr_multiplier", "grad_accum", "pack_tokens")} == \
        {"n_epochs": 3, "batch_size": 10, "lr_multiplier": 1.0, "grad_accum": 3, "pack_tokens": 2000}
    assert got["max_steps"] == steps_for(5000, 3, 10) == 1500
    assert schedule("--n_epochs=auto", n_examples=5000, mean_tokens=600.0)["max_steps"] == 4000  # the tiny LM: 8
    assert schedule("--n_epochs=auto", "--init_from=runs/vlm", n_examples=5000, mean_tokens=600.0)["n_epochs"] == 3


def test_given_values_are_kept_and_max_steps_wins():
    got = schedule("--n_epochs=2", "--batch_size=16", "--lr_multiplier=0.3", "--max_steps=7",
                   n_examples=10_000, mean_tokens=300.0)
    assert (got["n_epochs"], got["batch_size"], got["lr_multiplier"], got["max_steps"]) == (2, 16, 0.3, 7)


def test_the_run_logs_what_auto_chose_and_why(trained_vlm):
    """The shared tiny run leaves batch_size and lr_multiplier to auto (60 examples) and gives 6 epochs."""
    log = (trained_vlm / "stderr.txt").read_text()
    assert "auto: batch of 1: 0.2% of 60 examples, within 1-256" in log
    assert "auto: lr multiplier 2: batches of 1 examples" in log
    assert "auto: " + auto_epochs(60).reason not in log  # given, so not chosen
