"""mm.vlm.evaluate: VQA answer normalisation, which held-out turns are asked (and with which context), and the
exact-match scores evaluate_vqa computes from a chat object's replies."""
import json

import pytest

from mm.vlm.evaluate import evaluate_vqa, normalize_answer, read_eval_turns
from mm.vlm.inference import ChatReply


@pytest.mark.parametrize("text, want", [
    ("The Red circle.", "red circle"),
    ("a circle", "circle"),
    ("An orange star!", "orange star"),
    ("  Yes ", "yes"),
    ("Three", "3"),
    ("zero, twelve", "0 12"),
    ("thirteen", "thirteen"),  # number words end at twelve
    ("blue-green", "blue green"),
    ("the", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_normalize_answer_synonyms_replace_whole_words():
    synonyms = {"grey": "gray", "centre": "middle"}
    assert normalize_answer("The GREY square, centre.", synonyms) == "gray square middle"
    assert normalize_answer("greyish", synonyms) == "greyish"
    assert normalize_answer("grey") == "grey"  # none by default


# ---------------------------------------------------------------- which turns are asked

IMAGE = {"type": "image_url", "image_url": {"url": "images/a.png"}}


def user(text, image=False):
    return {"role": "user", "content": [IMAGE, {"type": "text", "text": text}] if image else text}


def assistant(text, **kw):
    return {"role": "assistant", "content": text, **kw}


LINES = [
    # 1: two short answers: two turns, each with the conversation before it
    {"messages": [user("What colour is the star?", image=True), assistant("red"), user("How many objects?"),
                  assistant("two")]},
    # 2: an answer with weight 0 is context, not a question
    {"messages": [user("Is there a star?", image=True), assistant("no", weight=0), user("Where is the circle?"),
                  assistant("left")]},
    # 3: a long answer (5 words) is counted, not asked
    {"messages": [user("Describe the image.", image=True), assistant("a large red circle there")]},
    "not json at all",
    # 5: a system prompt first
    {"messages": [{"role": "system", "content": "Be brief."}, user("What shape is the red object?", image=True),
                  assistant("circle")]},
    # 6: no messages key: skipped
    {"prompt": "x"},
]


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in LINES) + "\n")
    return path


def test_read_eval_turns_one_turn_per_short_answer_with_what_came_before(heldout):
    turns, long_answers = read_eval_turns(heldout)
    assert long_answers == 1
    assert [(t["line"], t["answer"], t["type"]) for t in turns] == \
        [(1, "red", "all"), (1, "two", "all"), (2, "left", "all"), (5, "circle", "all")]
    assert turns[0]["messages"] == LINES[0]["messages"][:1]
    assert turns[1]["messages"] == LINES[0]["messages"][:3]
    assert turns[2]["messages"] == LINES[1]["messages"][:3]  # the weight-0 answer stays as context
    assert turns[3]["messages"] == LINES[4]["messages"][:2]


def test_read_eval_turns_answer_length_limit_types_filter_and_limit(heldout):
    turns, long_answers = read_eval_turns(heldout, max_answer_words=5)
    assert long_answers == 0 and (turns[3]["line"], turns[3]["answer"]) == (3, "a large red circle there")

    turns, long_answers = read_eval_turns(heldout, types={1: "colour", 3: "describe", 5: "shape"})
    assert [(t["line"], t["type"]) for t in turns] == [(1, "colour"), (1, "colour"), (5, "shape")]
    assert long_answers == 1  # line 3 is in types, and too long

    turns, _ = read_eval_turns(heldout, limit=3)
    assert [(t["line"], t["answer"]) for t in turns] == [(1, "red"), (1, "two"), (2, "left")]


# ---------------------------------------------------------------- scores

class FakeChat:
    """Answers from a table keyed by the last user message; records each chat_batch call."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.calls = answers, []

    def chat_batch(self, conversations, max_new_tokens, image_root=None):
        self.calls.append((len(conversations), max_new_tokens, image_root))
        return [ChatReply(self.answers[self.question(c)], 10, 2, "stop") for c in conversations]

    @staticmethod
    def question(conversation) -> str:
        content = conversation[-1]["content"]
        return content if isinstance(content, str) else content[-1]["text"]


def test_evaluate_vqa_scores_normalised_exact_match_per_type(heldout):
    chat = FakeChat({"What colour is the star?": "The red.", "How many objects?": "Two",  # both right, normalised
                     "Where is the circle?": "right",  # wrong
                     "What shape is the red object?": "a circle"})  # right
    types = {1: "colour", 2: "where", 5: "shape"}
    out = evaluate_vqa(chat, heldout, batch_size=2, max_new_tokens=5, types=types)
    assert (out["vqa_acc"], out["vqa_n"], out["vqa_long_answers_skipped"]) == (0.75, 4, 0)
    assert {k: v for k, v in out.items() if k.startswith("vqa_acc/")} == \
        {"vqa_acc/colour": 1.0, "vqa_acc/shape": 1.0, "vqa_acc/where": 0.0}
    assert chat.calls == [(2, 5, str(heldout.parent)), (2, 5, str(heldout.parent))]  # images next to the file
    assert [(e["line"], e["reply"], e["ok"]) for e in out["examples"]] == \
        [(1, "The red.", True), (1, "Two", True), (2, "right", False), (5, "a circle", True)]


def test_evaluate_vqa_single_type_limit_and_own_normaliser(heldout):
    chat = FakeChat({"What colour is the star?": "RED", "How many objects?": "2", "Where is the circle?": "left"})
    out = evaluate_vqa(chat, heldout, limit=3, normalize=str.strip)  # case-sensitive: "RED" != "red"
    assert (out["vqa_acc"], out["vqa_n"]) == (pytest.approx(1 / 3), 3)
    assert not [k for k in out if k.startswith("vqa_acc/")]  # one type ("all"): no per-type scores
    assert chat.calls == [(3, 16, str(heldout.parent))]
