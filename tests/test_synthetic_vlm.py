"""data_tools.synthetic_vlm: chat lines the decoder accepts, answers true to the rendered scenes, held-out
phrasings and pairs that never reach training."""
import collections
import json
import random
import re

import pytest
from PIL import Image

import data_tools.synthetic_vlm as synth
from data_tools.synthetic_clip import COLOURS, SHAPES
from mm.decoders import chat_decoder
from mm.shards import read_samples

COUNTS = dict(train=40, align=16, heldout=48, prefs=14, image_size=32, seed=0)
SPLITS = ("align", "train", "heldout", "prefs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_synth")
    synth.write_synthetic_vlm(out, **COUNTS)
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sidecar(data, split):
    return read_jsonl(data / ("heldout_answers.jsonl" if split == "heldout" else f"{split}_scenes.jsonl"))


def texts(message):
    content = message["content"]
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def line_messages(line):
    """Every message of an SFT or preference line, in order."""
    if "messages" in line:
        return line["messages"]
    return line["input"]["messages"] + line["preferred_output"] + line["non_preferred_output"]


def test_files_counts_and_info(data):
    info = json.loads((data / "info.json").read_text())
    assert {k: info[k] for k in COUNTS} == COUNTS
    assert len(info["reserved_pairs"]) == 6
    for split in SPLITS:
        assert len(read_jsonl(data / f"{split}.jsonl")) == COUNTS[split] == len(sidecar(data, split))
        images = sorted((data / "images" / split).glob("*.png"))
        assert len(images) == COUNTS[split]
        assert Image.open(images[0]).size == (32, 32)
    assert info["heldout_scored"] == sum(r["type"] != "describe" for r in sidecar(data, "heldout")) == 42


def test_every_line_decodes_through_the_loader(data):
    decode, counts = chat_decoder(), collections.Counter()
    for split in SPLITS:
        chats = [decode(s) for s in read_samples([str(data / f"{split}.jsonl")], counts)]
        assert len(chats) == COUNTS[split] and counts["bad_shards"] == 0
        assert all(len(c["images"]) == 1 and c["images"][0].size == (32, 32) for c in chats)
        if split == "prefs":
            assert all(c["chosen"][0]["content"] != c["rejected"][0]["content"] for c in chats)
            continue
        for chat in chats:
            first = chat["messages"][0]["content"]
            assert [p["type"] for p in first] == ["image", "text"]  # the image comes first, then the question
            roles = [m["role"] for m in chat["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            assert (synth.TURNS[0] <= len(roles) // 2 <= synth.TURNS[1]) if split == "train" else len(roles) == 2


def test_heldout_phrasings_and_pairs_never_in_training(data):
    reserved = {tuple(p) for p in json.loads((data / "info.json").read_text())["reserved_pairs"]}
    assert {c for c, _ in reserved} == set(COLOURS) and {s for _, s in reserved} == set(SHAPES)
    seen_texts, seen_pairs = set(), set()
    for split in ("align", "train", "prefs"):
        seen_texts |= {t for line in read_jsonl(data / f"{split}.jsonl") for m in line_messages(line) for t in texts(m)}
        seen_pairs |= {(o["colour"], o["shape"]) for r in sidecar(data, split) for o in r["scene"]["objects"]}
    assert not seen_pairs & reserved
    assert {c for c, _ in seen_pairs} == set(COLOURS) and {s for _, s in seen_pairs} == set(SHAPES)
    assert not [t for t in seen_texts for c, s in reserved if f"{c} {s}" in t]
    heldout = [texts(line["messages"][0])[0] for line in read_jsonl(data / "heldout.jsonl")]
    assert not set(heldout) & seen_texts
    heldout_templates = {t for _, held in synth.PHRASINGS.values() for t in held}
    train_templates = {t for train, _ in synth.PHRASINGS.values() for t in train}
    assert not heldout_templates & train_templates
    records = sidecar(data, "heldout")
    novel = [r for r in records if "pair" in r["novel"]]
    assert len(novel) == 24  # every other block of 8 question types
    assert all(any((o["colour"], o["shape"]) in reserved for o in r["scene"]["objects"]) for r in novel)
    familiar = [r for r in records if r not in novel]
    assert not any((o["colour"], o["shape"]) in reserved for r in familiar for o in r["scene"]["objects"])


def test_leak_checks_fail_on_leaks(monkeypatch):
    reserved = [("red", "star")]
    synth.check_heldout_unseen({"What colour is the star?"}, {("red", "circle")}, {"Tell me the colour of the star."},
                               reserved)
    with pytest.raises(AssertionError, match="held-out question 'Q' occurs"):
        synth.check_heldout_unseen({"Q"}, set(), {"Q"}, reserved)
    with pytest.raises(AssertionError, match="reserved pair red star occurs in a training scene"):
        synth.check_heldout_unseen(set(), {("red", "star")}, set(), reserved)
    with pytest.raises(AssertionError, match="names a reserved pair"):
        synth.check_heldout_unseen({"Is there a red star?"}, set(), set(), reserved)
    synth.check_phrasings_disjoint()
    colour_train, colour_held = synth.PHRASINGS["colour"]
    monkeypatch.setitem(synth.PHRASINGS, "colour", (colour_train, colour_held + (colour_train[0],)))
    with pytest.raises(AssertionError, match="held-out phrasings equal training phrasings"):
        synth.check_phrasings_disjoint()


# what a frame's slots hold: one content word ("colour", "left"); what is asked about, as a template or filled
# in ("the {shape}", "the red object", "objects")
SLOTS = {"{attr}": r"\w+", "{rel}": r"\w+", "{thing}": r"(?:the [\w{} ]+|objects)"}


def frame_of(template: str) -> str | None:
    """The one attribute or relation frame a phrasing template fills, or None for a type's own phrasing."""
    found = []
    for frame in synth.ATTRIBUTE_FRAMES + synth.RELATION_FRAMES:
        pieces = re.split(r"(\{attr\}|\{rel\}|\{thing\})", frame)
        pattern = "".join(SLOTS.get(p) or re.escape(p) for p in pieces)
        if re.fullmatch(pattern, template[0].lower() + template[1:]) or re.fullmatch(pattern, template):
            found.append(frame)
    assert len(found) <= 1, (template, found)
    return found[0] if found else None


def test_heldout_frames_are_trained_with_other_question_types(data):
    """Read from PHRASINGS and from the held-out questions written: every attribute frame is trained with two to
    four question types (six of them with three or more), and every held-out attribute or relation question fills
    a frame that training uses for other types (never for its own), so neither a new frame nor a frame's one
    trained type gives it away."""
    trained = collections.defaultdict(set)
    for kind, (train, _) in synth.PHRASINGS.items():
        for template in train:
            trained[frame_of(template)].add(kind)
    assert all(2 <= len(trained[frame]) <= 4 for frame in synth.ATTRIBUTE_FRAMES), dict(trained)
    assert sum(len(trained[frame]) >= 3 for frame in synth.ATTRIBUTE_FRAMES) >= 6  # version 3: six frames read alike
    assert any(trained[frame] == {"left_of", "right_of"} for frame in synth.RELATION_FRAMES)
    framed_types = set(synth.ATTRIBUTE_PLAN) | set(synth.RELATION_PLAN)
    questions = {(r["type"], r["question"]) for r in sidecar(data, "heldout") if r["type"] in framed_types}
    templates = {(kind, t) for kind in framed_types for t in synth.PHRASINGS[kind][1]}
    assert {kind for kind, _ in templates} == framed_types
    assert {kind for kind, _ in questions} == framed_types
    for kind, template in templates:
        frame = frame_of(template)
        assert frame is not None, f"{kind}: held-out {template!r} is no frame"
        assert kind not in trained[frame] and trained[frame] - {kind}, (kind, template, trained[frame])
    for kind, question in questions:
        assert kind not in trained[frame_of(question)] and trained[frame_of(question)], (kind, question)


def test_training_questions_are_sometimes_wrapped_held_out_ones_never(data, tmp_path):
    """Version 4: a lead-in or "in the image" on training questions of every type, never on held-out ones; a
    wrapped question is its template filled, with the wrapping around it."""
    def unwrapped(question):  # the question without its lead-in, and without and with its " in the image"
        for lead in synth.LEAD_INS:
            if question.startswith(lead):
                rest = question[len(lead):]
                question = rest[0].upper() + rest[1:]
        return {question, question.replace(" in the image?", "?")}

    def filled(kind, which):
        return {t.format(colour=c, shape=sh, thing=f"{c} {sh}") for t in synth.PHRASINGS[kind][which]
                for c in COLOURS for sh in SHAPES}

    synth.write_synthetic_vlm(tmp_path, **{**COUNTS, "train": 300, "heldout": 16})
    turns = [t for r in sidecar(tmp_path, "train") for t in r["turns"]]
    wrapped = [t for t in turns if any(t["question"].startswith(lead) for lead in synth.LEAD_INS)
               or (t["question"].endswith(" in the image?") and t["question"] not in filled(t["type"], 0))]
    assert 0.25 < len(wrapped) / len(turns) < 0.6  # 1 - 0.75^2 = 0.44 where both fit
    assert {t["type"] for t in wrapped} == set(synth.QUESTION_TYPES)
    assert all(unwrapped(t["question"]) & filled(t["type"], 0) for t in turns)
    assert not {t["question"] for t in turns} & synth._heldout_texts()  # no wrapping makes a held-out phrasing
    rng = random.Random(0)  # "Can you see a red star?" + " in the image" is a held-out phrasing: never made
    assert all(not wrapped.endswith(" in the image?") for wrapped in
               (synth.wrap(rng, "Can you see a red star?") for _ in range(200)))
    held = sidecar(tmp_path, "heldout")
    assert all(r["question"] in filled(r["type"], 1) for r in held)  # held-out: the templates only


def oracle(scene, turn):
    """The answer, re-derived from the scene's geometry (x positions), not from its column words."""
    objects, target, kind = scene["objects"], turn["target"], turn["type"]
    if kind == "count":
        return str(len(objects))
    if kind == "exists":
        present = any(o["colour"] == target["colour"] and o["shape"] == target["shape"] for o in objects)
        return "yes" if present else "no"
    if kind == "describe":
        return None
    [obj] = [o for o in objects if all(o[k] == v for k, v in target.items())]  # the target is unique
    if kind in ("colour", "shape"):
        return obj[kind]
    if kind == "where":
        return ("left", "middle", "right")[int(obj["x"] * 3)]
    side = [o for o in objects if (o["x"] < obj["x"]) == (kind == "left_of") and o is not obj]
    assert len(side) <= 1, f"ambiguous {kind} question asked: {turn}"
    return f"{side[0]['colour']} {side[0]['shape']}" if side else "nothing"


def test_answers_hold_for_the_rendered_scenes(data):
    asked = collections.Counter()
    for split in SPLITS:
        lines = read_jsonl(data / f"{split}.jsonl")
        for record in sidecar(data, split):
            scene = record["scene"]
            objects = scene["objects"]
            assert 1 <= len(objects) <= 3
            assert len({o["colour"] for o in objects}) == len({o["shape"] for o in objects}) == len(objects)
            xs = [o["x"] for o in objects]
            assert xs == sorted(xs)  # left to right, never touching: a shape reaches at most 1.1 r sideways
            assert all(b["x"] - a["x"] > 1.1 * (a["r"] + b["r"]) for a, b in zip(objects, objects[1:]))
            image = Image.open(data / record["image"]).convert("RGB")
            for o in objects:  # the object's colour is drawn at its centre
                centre = (int(o["x"] * 32), int(o["y"] * 32))
                assert image.getpixel(centre) == pytest.approx(COLOURS[o["colour"]], abs=20)
            turns = record["turns"] if split != "heldout" else [record]
            said = [t for m in line_messages(lines[record["line"] - 1]) for t in texts(m)]
            for turn in turns:
                truth = oracle(scene, turn)
                assert truth is None or turn["answer"] == truth, (split, record["line"], turn)
                assert turn["question"] in said and turn["answer"] in said
                asked[turn["type"]] += 1
    assert set(asked) == set(synth.QUESTION_TYPES)


def test_yes_no_balanced_and_wrong_answers_plausible(data):
    for split in ("train", "heldout", "prefs"):
        records = sidecar(data, split)
        turns = [t for r in records for t in (r["turns"] if split != "heldout" else [r])]
        answers = collections.Counter(t["answer"] for t in turns if t["type"] == "exists")
        assert abs(answers["yes"] - answers["no"]) <= 1 and answers["yes"] >= 1, (split, answers)
    for r in sidecar(data, "prefs"):
        [turn] = r["turns"]
        assert turn["rejected"] != turn["answer"]
        assert synth.canonical_answer(turn["rejected"]) != synth.canonical_answer(turn["answer"])


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    small = dict(train=6, align=3, heldout=8, prefs=7, image_size=24)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synth.write_synthetic_vlm(tmp_path / name, seed=seed, **small)
    files = ["train.jsonl", "heldout_answers.jsonl", "prefs.jsonl", "images/train/000005.png"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_ensure_reuses_complete_data_and_rebuilds_on_change(tmp_path):
    small = dict(train=5, align=2, heldout=8, prefs=7, image_size=24)
    info = synth.ensure_synthetic_vlm(tmp_path, **small)
    stamp = (tmp_path / "train.jsonl").stat().st_mtime_ns
    assert synth.ensure_synthetic_vlm(tmp_path, **small) == info
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == stamp
    assert synth.ensure_synthetic_vlm(tmp_path, **{**small, "train": 3})["train"] == 3
    assert synth.ensure_synthetic_vlm(tmp_path, **{**small, "train": 3, "seed": 0})["train"] == 3  # the default
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 3  # no stale images left behind
    heldout = synth.load_heldout(tmp_path)
    assert len(heldout) == 8 and all(Image.open(r["image"]).size == (24, 24) for r in heldout)


@pytest.mark.parametrize("text, canonical", [
    ("The Red circle.", "red circle"), ("Two", "2"), (" Yes! ", "yes"), ("3 objects", "3 objects"),
    ("In the centre", "in middle"), ("an orange star", "orange star"), ("Grey", "gray"), ("none.", "nothing"),
    ("blue  \n diamond", "blue diamond"), ("", ""),
])
def test_canonical_answer(text, canonical):
    assert synth.canonical_answer(text) == canonical


def test_every_canonical_answer_is_its_own_canonical_form(data):
    answers = {r["answer"] for r in sidecar(data, "heldout") if r["type"] in synth.SCORED_TYPES}
    assert answers and all(synth.canonical_answer(a) == a for a in answers)
