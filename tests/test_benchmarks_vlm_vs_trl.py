"""benchmarks/vlm_vs_trl.py on tiny data: both sides hold the same model (equal loss on the same conversations),
tokenise the conversations into the same tokens, and train; the results file says so."""
import json

import pytest

from benchmarks import vlm_vs_trl
from tests.vlm_fixtures import tiny_vlm_data


@pytest.mark.slow
def test_ours_and_trls_llava_are_the_same_model_on_the_same_tokens_and_both_train(tmp_path_factory, tmp_path):
    pytest.importorskip("trl", reason="the peer: pip install -e .[test] (or .[bench]) installs trl")
    data = tiny_vlm_data(tmp_path_factory)
    res = vlm_vs_trl.main(["--samples=40", "--batch_size=4", "--skip_steps=2", f"--data={data}", f"--work={tmp_path}"])
    assert res["parity_loss"]["mm"] == pytest.approx(res["parity_loss"]["trl"], rel=1e-5)
    assert res["tokens"] == res["trl"]["tokens"] > 40 * 50  # TRL's collator made exactly our tokens
    for side in ("mm", "trl"):
        losses = res[side]["losses"]
        assert len(losses) == 10 and res[side]["timed_steps"] == 10 - 2
        assert sum(losses[-3:]) / 3 < losses[0] - 0.3  # both learn
        assert res[side]["examples_per_s"] > 0 and res[side]["tokens_per_s"] > res[side]["examples_per_s"]
        assert 3 <= res[side]["examples_per_step"] <= 5  # ours packs about --batch_size=4 conversations a step
    assert res["ratio_examples_per_s"] == pytest.approx(res["mm"]["examples_per_s"] / res["trl"]["examples_per_s"])
    assert json.loads((tmp_path / "results.json").read_text())["tokens"] == res["tokens"]
    assert (tmp_path / "mm" / "export" / "vlm_config.json").is_file()


def test_too_few_samples_to_time_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="too few steps"):
        vlm_vs_trl.main(["--samples=8", "--batch_size=4", f"--work={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown"):
        vlm_vs_trl.main(["--sides=mm,hf", f"--work={tmp_path}"])


def test_a_batch_shorter_than_the_longest_conversation_is_refused(tmp_path_factory, tmp_path):
    """Ours would pack more conversations a step than TRL's batch: not the same comparison."""
    data = tiny_vlm_data(tmp_path_factory)
    with pytest.raises(SystemExit, match="ours would pack more of them a step than TRL's batch"):
        vlm_vs_trl.main(["--samples=40", "--batch_size=1", "--skip_steps=2", f"--data={data}", f"--work={tmp_path}",
                         "--sides=mm"])
