import json
from collections import Counter

import pytest

from data_tools.synthetic_clip import (CAPTION_TEMPLATES, MULTI_TEMPLATES, ZEROSHOT_TEMPLATES, check_prompts_unseen,
                                       class_names, ensure_synthetic_clip, make_sample)
from mm.shards import expand_shard_spec, read_samples


def test_held_out_classes_and_prompts(synth_data):
    names = json.loads((synth_data / "zeroshot" / "classnames.json").read_text())
    templates = json.loads((synth_data / "zeroshot" / "templates.json").read_text())
    assert len(names) >= 20 and len(set(names)) == len(names)
    captions = set()
    for s in read_samples(expand_shard_spec(str(synth_data / "train"))[0].urls, {"bad_shards": 0}):
        captions.add(s["txt"].decode())
    assert len(captions) > 100
    prompts = {t.format(c) for c in names for t in templates}
    assert not prompts & captions


def test_prompt_leak_is_caught():
    with pytest.raises(AssertionError, match="a photo of a red circle"):
        check_prompts_unseen({"a small blue star", ZEROSHOT_TEMPLATES[0].format("red circle")})


def test_zeroshot_labels_match_rendered_class(synth_data):
    names = class_names()
    samples = list(read_samples(expand_shard_spec(str(synth_data / "zeroshot"))[0].urls, {"bad_shards": 0}))
    assert len(samples) == 2 * len(names)
    labels = [json.loads(s["json"]) for s in samples]
    assert all(names[lab["label_index"]] == lab["label"] for lab in labels)
    assert Counter(lab["label"] for lab in labels) == {n: 2 for n in names}  # balanced


def test_samples_vary_and_are_deterministic():
    import random
    a = [make_sample(random.Random(3), 32) for _ in range(1)]
    b = [make_sample(random.Random(3), 32) for _ in range(1)]
    assert a[0][1] == b[0][1] and a[0][0].tobytes() == b[0][0].tobytes()
    rng = random.Random(0)
    caps = [make_sample(rng, 32)[1] for _ in range(300)]
    assert len(set(caps)) > 150
    used = {t.split(" ")[0] for t in CAPTION_TEMPLATES + MULTI_TEMPLATES}
    assert len(used) >= 4  # several caption templates


def test_ensure_reuses_complete_data(tmp_path):
    info = ensure_synthetic_clip(tmp_path, train=20, val=4, zeroshot_per_class=1, image_size=16, per_shard=10)
    stamp = (tmp_path / "train" / "shard-000000.tar").stat().st_mtime_ns
    again = ensure_synthetic_clip(tmp_path, train=20, val=4, zeroshot_per_class=1, image_size=16, per_shard=10)
    assert again == info and (tmp_path / "train" / "shard-000000.tar").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "train").glob("*.tar"))) == 2
