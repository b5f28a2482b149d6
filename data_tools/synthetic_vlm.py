"""Synthetic vision-chat data: the built-in data that makes the vision-chat recipe run out of the box.

Each image shows 1-3 objects drawn by the CLIP recipe's renderer (data_tools/synthetic_clip.py), each of
its own colour and its own shape, one per column (left, middle, right) at a random height, small or
large, on a white, black or gray background. Because colours and shapes are never repeated within a
scene and columns never shared, "the star", "the red object" and "what is left of the red circle" each
name exactly one thing, and every question has one short canonical answer for exact-match scoring.

    <out>/images/<split>/NNNNNN.png   the scenes (split: align, train, heldout, prefs)
    <out>/align.jsonl                 captions, for projector alignment: user = image + "Describe the image."
    <out>/train.jsonl                 multi-turn Q&A for SFT: the image in the first user message, 2-4 turns
    <out>/heldout.jsonl               one question per line: held-out phrasings, on new scenes, half of them
                                      showing a (colour, shape) pair that never occurs outside this split
    <out>/heldout_answers.jsonl       per held-out line: {"line", "image", "type", "question", "answer",
                                      "novel": ["phrasing"(, "pair")], "scene"} (what evaluation reads)
    <out>/prefs.jsonl                 preference pairs in OpenAI's DPO format: correct vs plausible wrong answer
    <out>/{align,train,prefs}_scenes.jsonl   per line: {"line", "image", "scene", "turns": [{"type", "answer", ...}]}
    <out>/info.json                   counts, seed, image size, reserved pairs (written last: its presence
                                      means the data is complete)

The chat files are OpenAI fine-tuning JSONL exactly: lines hold only "messages" (or "input",
"preferred_output", "non_preferred_output"), images are paths relative to the file's folder. What
evaluation needs beyond that lives in the sidecars, keyed by 1-based line number (mm's loader names a
line "<stem>:<line>").

Question types and their canonical answers (see `canonical_answer` for how a prediction is compared):

    colour    What colour is the star?               red
    shape     What shape is the red object?          star
    count     How many objects are there?            2          (a digit)
    exists    Is there a red star?                   yes | no   (balanced: alternate per split)
    left_of   What is left of the red star?          blue circle | nothing
    right_of  What is right of the red star?         blue circle | nothing
    where     Where is the red star?                 left | middle | right
    describe  Describe the image.                    a caption (not exact-match scored)

Held-out phrasings and reserved pairs never reach the other splits: `write_synthetic_vlm` checks this
(`check_heldout_unseen`) and fails if a phrasing or scene change ever breaks it.

    python -m data_tools.synthetic_vlm --out=data/vlm_synth
"""
from __future__ import annotations

import argparse
import functools
import inspect
import io
import itertools
import json
import random
import re
from pathlib import Path

from data_tools.synthetic_clip import BACKGROUNDS, COLOURS, SHAPES, _jitter, render
from mm.vlm.evaluate import normalize_answer

INFO_VERSION = 4  # bump when what a given set of arguments writes changes (2: frame x word phrasings,
#                    3: six more frames trained for every attribute type, four more exists phrasings,
#                    4: training questions sometimes wrapped, see wrap)
COLUMNS = ("left", "middle", "right")  # one object per column: left/right relations are never ambiguous
COLUMN_X = (1 / 6, 1 / 2, 5 / 6)  # column centres, fraction of the image side
X_JITTER = 0.01  # so that even two large stars in neighbouring columns never touch (half-width <= 1.1 r)
OBJECT_SIZES = {"small": (0.09, 0.11), "large": (0.12, 0.14)}  # radius / image side; >= 2.9 px at 32 px
RESERVED_SEED = 0  # the reserved (held-out) pairs do not change with the data seed
NOTHING = "nothing"  # the answer to "what is left of X" when nothing is
SCORED_TYPES = ("colour", "shape", "count", "exists", "left_of", "right_of", "where")
QUESTION_TYPES = SCORED_TYPES + ("describe",)

# Questions are frames x content words. Every attribute frame is trained with two or three question types and
# held out for another, so a held-out phrasing is a frame the model has read, with a content word it has read
# in other frames: to answer it the model must read the word, not recognise the frame. (Version 1 held out
# frames that training used for one other type only, and the tiny LM answered that type from the frame.)
# The last six frames are trained with every attribute type and held out for none: the more frames that
# read alike across types, the more the model must take the type from the attribute word (version 3; with
# the first six alone, the tiny LM still answered held-out colour frames by the frame's trained types).
ATTRIBUTE_FRAMES = ("What {attr} is {thing}?", "Which {attr} is {thing}?", "What is the {attr} of {thing}?",
                    "Tell me the {attr} of {thing}.", "Name the {attr} of {thing}.", "{thing} is which {attr}?",
                    "Say the {attr} of {thing}.", "Give me the {attr} of {thing}.", "Which {attr} does {thing} have?",
                    "I would like to know the {attr} of {thing}.", "Please state the {attr} of {thing}.",
                    "Look at {thing}. What {attr} is it?")
# type -> (attribute word, what is asked about, one letter per frame: T trained, H held out, - not used because
# the sentence would not be English: "What number is objects?")
ATTRIBUTE_PLAN = {"colour": ("colour", "the {shape}", "TTTHTH" "TTTTTT"),
                  "shape": ("shape", "the {colour} object", "THTTHT" "TTTTTT"),
                  "where": ("position", "the {thing}", "HTHTTT" "TTTTTT"),
                  "count": ("number", "objects", "--THT-" "TT--T-")}
# Two relation types only, so a frame held out for one is trained for the other; two frames train both, so
# that the model learns that "left" and "right" decide the answer inside one frame.
RELATION_FRAMES = ("What is {rel} of {thing}?", "What is to the {rel} of {thing}?", "Which object is {rel} of {thing}?",
                   "Name the object to the {rel} of {thing}.", "Tell me what is {rel} of {thing}.",
                   "Which object is to the {rel} of {thing}?")
RELATION_PLAN = {"left_of": ("left", "TTHTHT"), "right_of": ("right", "TTTHTH")}
# Phrasings of one type only, trained and held out: no other type asks yes/no or wants a caption, and the
# count and where ones are the plain questions a user asks first.
OWN_PHRASINGS = {
    "count": (("How many objects are there?", "How many objects are in the image?", "How many objects can you see?"),
              ()),
    "where": (("Where is the {thing}?", "Where is the {thing} in the image?",
               "Which part of the image is the {thing} in?"), ()),
    "exists": (("Is there a {thing}?", "Is there a {thing} in the image?", "Can you see a {thing}?",
                "Is a {thing} there?", "Do you see a {thing}?", "Does the image show a {thing}?",
                "Is there a {thing} in the picture?", "Is any {thing} visible?"),
               ("Can you see a {thing} in the image?", "Tell me if there is a {thing}.")),
    "describe": (("Describe the image.", "What do you see?", "Describe this picture.",
                  "Write a caption for the image."),
                 ("Tell me what the image shows.", "What is in the picture?")),
}


def frame_phrasings() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """type -> (training phrasings, held-out phrasings): the frames filled with each type's words, per its
    plan, plus its own phrasings. Phrasings are templates over {colour}, {shape} and {thing}."""
    planned = {kind: (ATTRIBUTE_FRAMES, letters, {"attr": attr, "thing": thing})
               for kind, (attr, thing, letters) in ATTRIBUTE_PLAN.items()}
    planned |= {kind: (RELATION_FRAMES, letters, {"rel": rel, "thing": "the {thing}"})
                for kind, (rel, letters) in RELATION_PLAN.items()}
    out = {}
    for kind in QUESTION_TYPES:
        train, held = OWN_PHRASINGS.get(kind, ((), ()))
        frames, letters, words = planned.get(kind, ((), "", {}))
        filled = {letter: tuple(_capitalise(f.format(**words)) for f, x in zip(frames, letters) if x == letter)
                  for letter in "TH"}
        out[kind] = (filled["T"] + train, filled["H"] + held)
    return out


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


PHRASINGS = frame_phrasings()
CAPTION_STYLES = ("list", "count")  # align captions come in both; SFT "describe" answers use "list" only
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TRAIN_TYPE_WEIGHTS = {**{t: 1.0 for t in SCORED_TYPES}, "describe": 0.5}
TURNS = (2, 4)  # questions per training conversation, at least and at most (distinct types; 4-7 did worse)
# Training questions (not held-out ones) sometimes come wrapped: a lead-in before, or "in the image" before the
# question mark, the same for every type. Without them the tiny LM took the type from such edges ("Can you see a
# red star in the image?", a held-out exists phrasing, got "left": "in the image?" ended where questions) rather
# than from the words that say it. `wrap` never makes a held-out phrasing (check_heldout_unseen checks the written data).
WRAP_PROBABILITY = 0.25  # each of lead-in and "in the image", independently
LEAD_INS = ("Look at the image. ", "Question: ", "Tell me, ", "Please answer: ", "One question: ", "Now, ")


# ---------------------------------------------------------------- scenes

def all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def reserved_pairs(seed: int = RESERVED_SEED) -> list[tuple[str, str]]:
    """The (colour, shape) pairs seen only in held-out scenes: one per colour and one per shape (a random
    matching, 6 of the 36), so every colour and every shape still appears in training with 5 partners."""
    shapes = list(SHAPES)
    random.Random(seed).shuffle(shapes)
    return list(zip(COLOURS, shapes))


def make_scene(rng: random.Random, pairs: list[tuple[str, str]], n_objects: int,
               include: tuple[str, str] | None = None) -> dict:
    """A random scene: {"background", "objects": [{"colour", "shape", "size", "position", "x", "y", "r"}]},
    objects left to right, colours and shapes all distinct, drawn from `pairs` (plus `include` if given).
    x, y (centre) and r (radius) are fractions of the image side, so a scene renders at any size."""
    chosen = [include] if include else []
    while len(chosen) < n_objects:
        c, s = rng.choice(pairs)
        if all(c != c2 and s != s2 for c2, s2 in chosen):
            chosen.append((c, s))
    rng.shuffle(chosen)
    objects = []
    for (colour, shape), col in zip(chosen, sorted(rng.sample(range(len(COLUMNS)), n_objects))):
        size = rng.choice(list(OBJECT_SIZES))
        r = rng.uniform(*OBJECT_SIZES[size])
        x = COLUMN_X[col] + rng.uniform(-X_JITTER, X_JITTER)
        y = rng.uniform(1.2 * r, 1 - 1.2 * r)  # stars and diamonds reach 1.15 r above and below the centre
        objects.append({"colour": colour, "shape": shape, "size": size, "position": COLUMNS[col],
                        "x": round(x, 4), "y": round(y, 4), "r": round(r, 4)})
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def render_scene(scene: dict, image_size: int, rng: random.Random):
    """The scene as a PIL RGB image of image_size x image_size; colours get a small random shade jitter."""
    objects = [(o["shape"], _jitter(COLOURS[o["colour"]], rng), o["x"] * image_size, o["y"] * image_size,
                o["r"] * image_size) for o in scene["objects"]]
    return render(objects, _jitter(BACKGROUNDS[scene["background"]], rng, 10), image_size)


def thing(obj: dict) -> str:
    """How questions and answers name an object: "red circle"."""
    return f"{obj['colour']} {obj['shape']}"


def caption(scene: dict, style: str = "list") -> str:
    """"a large red circle on the left and a small blue star in the middle on a white background"
    ("list"), or "two objects on a white background: a large red circle on the left and ..." ("count")."""
    where = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
    parts = [f"a {o['size']} {thing(o)} {where[o['position']]}" for o in scene["objects"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(parts)
    if style == "count":
        return f"{COUNT_WORDS[n]} object{'s' * (n > 1)} on a {scene['background']} background: {listed}"
    return f"{listed} on a {scene['background']} background"


# ---------------------------------------------------------------- questions

def side_objects(scene: dict, obj: dict, side: str) -> list[dict]:
    """Objects strictly left (side="left_of") or right ("right_of") of `obj`, by column."""
    col = COLUMNS.index(obj["position"])
    sign = -1 if side == "left_of" else 1
    return [o for o in scene["objects"] if (COLUMNS.index(o["position"]) - col) * sign > 0]


def answer_question(scene: dict, kind: str, target: dict | None) -> str:
    """The canonical answer to a question of type `kind` about `target` ({"colour"?, "shape"?}) in `scene`.
    The one place answers come from, so tests and evaluation can re-derive any answer from a scene."""
    objects = scene["objects"]
    if kind == "count":
        return str(len(objects))
    if kind == "describe":
        return caption(scene)
    if kind == "exists":
        present = any(o["colour"] == target["colour"] and o["shape"] == target["shape"] for o in objects)
        return "yes" if present else "no"
    obj = next(o for o in objects if all(o[k] == v for k, v in target.items()))
    if kind == "colour":
        return obj["colour"]
    if kind == "shape":
        return obj["shape"]
    if kind == "where":
        return obj["position"]
    beside = side_objects(scene, obj, kind)
    if len(beside) > 1:
        raise ValueError(f"{kind} of {thing(obj)} is ambiguous: {[thing(o) for o in beside]}")
    return thing(beside[0]) if beside else NOTHING


def relation_targets(scene: dict, kind: str) -> tuple[list[dict], list[dict]]:
    """(objects with exactly one object on that side, objects with none): the unambiguous targets."""
    counts = [(o, len(side_objects(scene, o, kind))) for o in scene["objects"]]
    return [o for o, n in counts if n == 1], [o for o, n in counts if n == 0]


def pick_target(rng: random.Random, scene: dict, kind: str, focus: dict | None) -> dict | None:
    """The object a question is about (None for count/describe). `focus` (an object of the scene) is
    asked about when the question type allows; for left_of/right_of it may be the answer instead."""
    objects = scene["objects"]
    if kind in ("count", "describe", "exists"):
        return None
    if kind in ("colour", "shape", "where"):
        obj = focus or rng.choice(objects)
        return {"shape": obj["shape"]} if kind == "colour" else {"colour": obj["colour"]} if kind == "shape" \
            else {"colour": obj["colour"], "shape": obj["shape"]}
    one, none = relation_targets(scene, kind)
    if focus is not None:
        asked = [o for o in one if focus is o or side_objects(scene, o, kind)[0] is focus]
        obj = rng.choice(asked or [o for o in none if o is focus] or one + none)
    else:  # "nothing" answers a quarter of the time at most: the model should mostly name objects
        obj = rng.choice(one) if one and (not none or rng.random() < 0.75) else rng.choice(none)
    return {"colour": obj["colour"], "shape": obj["shape"]}


def pick_exists_target(rng: random.Random, scene: dict, yes: bool, absent: list[tuple[str, str]],
                       focus: dict | None) -> dict:
    """A present object (yes), or an absent pair from `absent`; most absent ones share a colour or a shape
    with an object in the scene, so that "is there a red star" needs both attributes, not one."""
    if yes:
        obj = focus or rng.choice(scene["objects"])
        return {"colour": obj["colour"], "shape": obj["shape"]}
    present = {(o["colour"], o["shape"]) for o in scene["objects"]}
    candidates = [p for p in absent if p not in present]
    near = [p for p in candidates if any(p[0] == c or p[1] == s for c, s in present)]
    colour, shape = rng.choice(near if near and rng.random() < 0.7 else candidates)
    return {"colour": colour, "shape": shape}


def pose(rng: random.Random, scene: dict, kind: str, phrasings: tuple[str, ...], target: dict | None) -> dict:
    """{"type", "question", "answer", "target"}: a question of `kind` about `target`, phrased by one of
    `phrasings`."""
    fill = {"shape": (target or {}).get("shape"), "colour": (target or {}).get("colour")}
    if target and len(target) == 2:
        fill["thing"] = f"{target['colour']} {target['shape']}"
    question = rng.choice(phrasings).format(**fill)
    return {"type": kind, "question": question, "answer": answer_question(scene, kind, target), "target": target}


# ---------------------------------------------------------------- canonical answers (exact match)

_SYNONYMS = {"center": "middle", "centre": "middle", "grey": "gray", "color": "colour", "none": NOTHING}


def canonical_answer(text: str) -> str:
    """An answer reduced for exact-match comparison: lower case, punctuation dropped, articles (a, an, the)
    dropped, number words zero..ten as digits, a few spellings unified (center/centre -> middle,
    grey -> gray, none -> nothing), whitespace collapsed.
    "The Red circle." -> "red circle"; "Two" -> "2"; " Yes! " -> "yes"."""
    return normalize_answer(text, _SYNONYMS)


# ---------------------------------------------------------------- lines

def image_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": path}}


def chat_line(image: str, turns: list[dict]) -> dict:
    """OpenAI SFT line: the image in the first user message, then each turn's question and answer."""
    messages = []
    for i, turn in enumerate(turns):
        text = {"type": "text", "text": turn["question"]}
        messages.append({"role": "user", "content": [image_part(image), text] if i == 0 else turn["question"]})
        messages.append({"role": "assistant", "content": turn["answer"]})
    return {"messages": messages}


def wrong_answer(rng: random.Random, scene: dict, turn: dict) -> str:
    """A plausible wrong answer to `turn`: another colour/shape/object of the scene where there is one."""
    kind, right = turn["type"], turn["answer"]
    objects = scene["objects"]
    if kind == "exists":
        return "no" if right == "yes" else "yes"
    options = {"colour": ([o["colour"] for o in objects], list(COLOURS)),
               "shape": ([o["shape"] for o in objects], list(SHAPES)),
               "count": ([], ["1", "2", "3"]),
               "where": ([o["position"] for o in objects], list(COLUMNS)),
               "left_of": ([thing(o) for o in objects], [NOTHING]),
               "right_of": ([thing(o) for o in objects], [NOTHING])}[kind]
    near = [a for a in options[0] if a != right]
    return rng.choice(near or [a for a in options[1] if a != right])


def filled_phrasings(which: int) -> set[str]:
    """Every training (which=0) or held-out (1) phrasing of every type, filled with every colour and shape."""
    return {template.format(colour=c, shape=s, thing=f"{c} {s}") for train_and_heldout in PHRASINGS.values()
            for template, (c, s) in itertools.product(train_and_heldout[which], all_pairs())}


def check_phrasings_disjoint() -> None:
    """Fail if a held-out phrasing, filled with any colour and shape, equals a training one (of any type)."""
    leaked = filled_phrasings(0) & filled_phrasings(1)
    if leaked:
        raise AssertionError(f"held-out phrasings equal training phrasings: {sorted(leaked)[:5]}")


def check_heldout_unseen(seen_texts: set[str], seen_pairs: set[tuple[str, str]], heldout_questions: set[str],
                         reserved: list[tuple[str, str]]) -> None:
    """Fail if a held-out question is also a text of the other splits, if a reserved pair occurs in one of
    their scenes, or if any of their texts names a reserved pair ("red star")."""
    leaks = [f"held-out question {q!r} occurs in training" for q in sorted(heldout_questions & seen_texts)[:5]]
    leaks += [f"reserved pair {c} {s} occurs in a training scene" for c, s in reserved if (c, s) in seen_pairs]
    names = re.compile(r"\b(" + "|".join(f"{c} {s}" for c, s in reserved) + r")s?\b")
    leaks += [f"training text names a reserved pair: {t!r}" for t in sorted(seen_texts) if names.search(t)][:5]
    if leaks:
        raise AssertionError("held-out data leaks into training: " + "; ".join(leaks))


# ---------------------------------------------------------------- splits: each yields (scene, chat line, turns)

def sample_types(rng: random.Random, k: int) -> list[str]:
    """k distinct question types, by TRAIN_TYPE_WEIGHTS."""
    types, weights, chosen = list(TRAIN_TYPE_WEIGHTS), list(TRAIN_TYPE_WEIGHTS.values()), []
    while len(chosen) < k:
        kind = rng.choices(types, weights)[0]
        if kind not in chosen:
            chosen.append(kind)
    return chosen


def wrap(rng: random.Random, question: str) -> str:
    """A training question, sometimes with a lead-in ("Tell me, what colour is the star?") and sometimes with
    "in the image" before its question mark (LEAD_INS, WRAP_PROBABILITY): the same edges for every question type."""
    if question.endswith("?") and not re.search(r"\b(image|picture)\b", question) and rng.random() < WRAP_PROBABILITY:
        longer = question[:-1] + " in the image?"
        question = question if longer in _heldout_texts() else longer  # "Can you see a red star?" stays as it is
    if rng.random() < WRAP_PROBABILITY:
        lead = rng.choice(LEAD_INS)
        longer = lead + (question[0].lower() + question[1:] if lead.endswith(", ") else question)
        question = question if longer in _heldout_texts() else longer
    return question


@functools.cache
def _heldout_texts() -> frozenset[str]:
    return frozenset(filled_phrasings(1))


def ask(rng: random.Random, scene: dict, kind: str, which: int, yes_no: list[int], absent: list[tuple[str, str]],
        focus: dict | None = None) -> dict:
    """One question of `kind` in phrasing set `which` (0 train, sometimes wrapped; 1 held-out). Yes/no questions alternate
    yes, no, yes... through the counter `yes_no` ([n asked so far]), so every split is balanced."""
    if kind == "exists":
        target = pick_exists_target(rng, scene, yes_no[0] % 2 == 0, absent, focus)
        yes_no[0] += 1
    else:
        target = pick_target(rng, scene, kind, focus)
    turn = pose(rng, scene, kind, PHRASINGS[kind][which], target)
    if which == 0:
        turn["question"] = wrap(rng, turn["question"])
    return turn


def align_items(rng: random.Random, n: int, pairs: list, image_pattern: str):
    for i in range(n):
        scene = make_scene(rng, pairs, rng.randint(1, 3))
        turn = {"type": "describe", "question": rng.choice(PHRASINGS["describe"][0]),
                "answer": caption(scene, rng.choice(CAPTION_STYLES)), "target": None}
        yield scene, chat_line(image_pattern % i, [turn]), [turn]


def train_items(rng: random.Random, n: int, pairs: list, image_pattern: str):
    yes_no = [0]
    for i in range(n):
        scene = make_scene(rng, pairs, rng.randint(1, 3))
        turns = [ask(rng, scene, kind, 0, yes_no, pairs) for kind in sample_types(rng, rng.randint(*TURNS))]
        yield scene, chat_line(image_pattern % i, turns), turns


def heldout_items(rng: random.Random, n: int, pairs: list, reserved: list, image_pattern: str):
    """Question types in turn, all in held-out phrasings; every other block of len(QUESTION_TYPES) items
    shows a reserved pair and asks about it (or, for "no" answers, about another reserved pair)."""
    yes_no = [0]
    for i in range(n):
        kind, novel_pair = QUESTION_TYPES[i % len(QUESTION_TYPES)], (i // len(QUESTION_TYPES)) % 2 == 1
        include = rng.choice(reserved) if novel_pair else None
        scene = make_scene(rng, pairs, rng.randint(1, 3), include=include)
        focus = next((o for o in scene["objects"] if (o["colour"], o["shape"]) == include), None)
        turn = ask(rng, scene, kind, 1, yes_no, reserved if novel_pair else pairs, focus)
        turn["novel"] = ["phrasing", "pair"] if novel_pair else ["phrasing"]
        yield scene, chat_line(image_pattern % i, [turn]), [turn]


def prefs_items(rng: random.Random, n: int, pairs: list, image_pattern: str):
    """OpenAI DPO lines: the scored question types in turn, the right answer preferred over a wrong one."""
    yes_no = [0]
    for i in range(n):
        kind = SCORED_TYPES[i % len(SCORED_TYPES)]
        scene = make_scene(rng, pairs, rng.randint(1, 3))
        turn = ask(rng, scene, kind, 0, yes_no, pairs)
        turn["rejected"] = wrong_answer(rng, scene, turn)
        line = {"input": {"messages": chat_line(image_pattern % i, [turn])["messages"][:1]},
                "preferred_output": [{"role": "assistant", "content": turn["answer"]}],
                "non_preferred_output": [{"role": "assistant", "content": turn["rejected"]}]}
        yield scene, line, [turn]


# ---------------------------------------------------------------- writing

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: these images are tiny and flat
    return buf.getvalue()


def write_split(out: Path, split: str, items, image_size: int, rng: random.Random, sidecar: str,
                as_record=lambda record: record) -> list[dict]:
    """Render and save each item's scene to images/<split>/, write <split>.jsonl and its sidecar of
    as_record({"line", "image", "scene", "turns"}) per line; returns the sidecar records."""
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a smaller re-build must not leave stale images behind
        old.unlink()
    records = []
    with open(out / f"{split}.jsonl", "w") as lines, open(out / sidecar, "w") as side:
        for i, (scene, line, turns) in enumerate(items):
            image = f"images/{split}/{i:06d}.png"
            (out / image).write_bytes(_png(render_scene(scene, image_size, rng)))
            lines.write(json.dumps(line) + "\n")
            record = as_record({"line": i + 1, "image": image, "scene": scene, "turns": turns})
            side.write(json.dumps(record) + "\n")
            records.append(record)
    return records


def heldout_record(record: dict) -> dict:
    """A held-out sidecar record, flat: {"line", "image", "type", "question", "answer", "novel", "target", "scene"}."""
    turn = record["turns"][0]
    return {"line": record["line"], "image": record["image"], **turn, "scene": record["scene"]}


def seen_in(records: list[dict]) -> tuple[set[str], set[tuple[str, str]]]:
    """(every question and answer text, every (colour, shape) shown) of a split's sidecar records."""
    texts = {t for r in records for turn in r["turns"] for t in (turn["question"], turn["answer"], turn.get("rejected"))
             if t}
    return texts, {(o["colour"], o["shape"]) for r in records for o in r["scene"]["objects"]}


def write_synthetic_vlm(out: str | Path, train: int = 8000, align: int = 2000, heldout: int = 1200, prefs: int = 300,
                        image_size: int = 64, seed: int = 0) -> dict:
    """Write every split, its sidecar and (last) info.json under `out`; returns the info dict.
    Raises AssertionError, before info.json is written, if held-out data leaks into the other splits."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)
    check_phrasings_disjoint()
    reserved = reserved_pairs()
    pairs = [p for p in all_pairs() if p not in reserved]
    rngs = [random.Random(seed * 10 + k) for k in range(4)]  # one stream per split: changing one count keeps the rest
    image_pattern = "images/{}/%06d.png"  # a line's image: image_pattern.format(split) % index
    seen_texts, seen_pairs = set(), set()
    for split, n, items, rng in (("align", align, align_items, rngs[0]), ("train", train, train_items, rngs[1]),
                                 ("prefs", prefs, prefs_items, rngs[2])):
        records = write_split(out, split, items(rng, n, pairs, image_pattern.format(split)), image_size, rng,
                              f"{split}_scenes.jsonl")
        texts, shown = seen_in(records)
        seen_texts |= texts
        seen_pairs |= shown
    items = heldout_items(rngs[3], heldout, pairs, reserved, image_pattern.format("heldout"))
    answers = write_split(out, "heldout", items, image_size, rngs[3], "heldout_answers.jsonl", heldout_record)
    check_heldout_unseen(seen_texts, seen_pairs, {a["question"] for a in answers}, reserved)
    info = {"version": INFO_VERSION, "train": train, "align": align, "heldout": heldout, "prefs": prefs,
            "image_size": image_size, "seed": seed, "reserved_pairs": [list(p) for p in reserved],
            "question_types": list(QUESTION_TYPES), "scored_types": list(SCORED_TYPES),
            "heldout_scored": sum(a["type"] in SCORED_TYPES for a in answers)}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info


def ensure_synthetic_vlm(out: str | Path, **kwargs) -> dict:
    """Write the data unless a complete copy with the same settings (given or default) is already there."""
    info_path = Path(out) / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        defaults = {k: p.default for k, p in inspect.signature(write_synthetic_vlm).parameters.items() if k != "out"}
        want = {"version": INFO_VERSION, **defaults, **kwargs}
        if all(info.get(k) == v for k, v in want.items()):
            return info
    return write_synthetic_vlm(out, **kwargs)


def load_heldout(out: str | Path) -> list[dict]:
    """The held-out questions for evaluation: heldout_answers.jsonl's records, "image" made absolute.
    Score with canonical_answer(prediction) == record["answer"] where record["type"] in SCORED_TYPES."""
    out = Path(out)
    records = [json.loads(line) for line in (out / "heldout_answers.jsonl").read_text().splitlines() if line.strip()]
    return [{**r, "image": str(out / r["image"])} for r in records]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/vlm_synth")
    p.add_argument("--train", type=int, default=8000, help="multi-turn Q&A conversations")
    p.add_argument("--align", type=int, default=2000, help="image-caption lines")
    p.add_argument("--heldout", type=int, default=1200, help="held-out questions, one per line (the default: 1,050 scored, ~0.01 standard error at 0.85)")
    p.add_argument("--prefs", type=int, default=300, help="preference pairs")
    p.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = write_synthetic_vlm(a.out, a.train, a.align, a.heldout, a.prefs, a.image_size, a.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
