"""benchmarks/asr_vs_hf.py reads the ASR recipe's corpus settings from the recipe itself (its default --data path
builds the built-in corpus with them)."""
import dataclasses
import sys

from tests.helpers import ROOT, load_recipe

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_recipe_defaults_are_the_asr_recipes_config():
    import asr_vs_hf

    cfg = asr_vs_hf.recipe_defaults()  # raised AttributeError when the module was not registered in sys.modules
    want = load_recipe("asr").ASRConfig()
    assert dataclasses.asdict(cfg) == dataclasses.asdict(want)
    assert cfg.synthetic_per_language > 0 and cfg.synthetic_words > 0
