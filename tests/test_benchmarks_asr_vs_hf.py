"""benchmarks/asr_vs_hf.py reads the ASR recipe's corpus settings from the recipe itself (its default --data path
builds the built-in corpus with them)."""
import dataclasses

from tests.helpers import load_recipe


def test_recipe_defaults_are_the_asr_recipes_config():
    from benchmarks.asr_vs_hf import recipe_defaults

    cfg = recipe_defaults()  # raised AttributeError when the module was not registered in sys.modules
    want = load_recipe("asr").ASRConfig()
    assert dataclasses.asdict(cfg) == dataclasses.asdict(want)
    assert cfg.synthetic_per_language > 0 and cfg.synthetic_words > 0
