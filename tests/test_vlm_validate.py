"""mm.vlm.validate: a crafted JSONL with one line per kind of error, each reported with its line number and
reason; exact statistics on the good lines (a tokenizer with one token per character makes them countable
by hand); the CLI's output and exit code."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest

from mm.vlm.chat import IMAGE_TOKEN
from mm.vlm.validate import REASONS, format_report, main, validate_file
from tests.helpers import ROOT, SUBPROCESS_ENV, png_bytes

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_TOKENS, MAX_TOKENS, EPOCHS = 8, 120, 3
LIMITS = dict(max_tokens=MAX_TOKENS, image_tokens=IMAGE_TOKENS, epochs=EPOCHS, max_images=2, max_pixels=10_000,
              max_image_bytes=100_000)
CLI_LIMITS = [f"--{k}={v}" for k, v in LIMITS.items()]


@pytest.fixture(scope="module")
def char_tokenizer():
    """Byte-level BPE with no merges: one token per (ASCII) character, one per special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials), special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(["no merges wanted"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHATML
    assert len(tokenizer("hello there", add_special_tokens=False)["input_ids"]) == 11
    return tokenizer


def chatml_tokens(*turns: tuple[str, str]) -> int:
    """Tokens of turns (role, content) rendered by CHATML, by hand: a character each, a special token
    one, an image IMAGE_TOKENS."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return len(re.sub(r"<\|im_(start|end)\|>", "#", text.replace(IMAGE_TOKEN, "#" * IMAGE_TOKENS)))


def user(*parts) -> dict:
    """A user message: str parts are text, others already parts."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def answer(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


@pytest.fixture
def data(tmp_path):
    """tmp_path/data.jsonl: {line number: (line, expected kind or None for a good line)}."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes((200, 30, 30)))
    (tmp_path / "img" / "blue.png").write_bytes(png_bytes((30, 30, 200)))
    (tmp_path / "img" / "broken.png").write_bytes(b"this is not a PNG at all")
    (tmp_path / "img" / "wide.png").write_bytes(png_bytes(size=120))  # 14,400 pixels > 10,000
    (tmp_path / "img" / "heavy.png").write_bytes(os.urandom(150_000))  # > 100,000 bytes
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((30, 200, 30))).decode()
    lines = {
        1: ({"messages": [user("Hi"), answer("Hello")]}, None),
        2: ('{"messages": [', "not_json"),
        3: ([1, 2], "not_object"),
        4: ({"prompt": "x", "completion": "y"}, "no_messages"),
        5: ({"messages": [{"content": "Hi"}, answer("Hello")]}, "missing_key"),
        6: ({"messages": [{"role": "user", "content": "Hi", "foo": 1}, answer("Hello")]}, "unknown_key"),
        7: ({"messages": [{"role": "robot", "content": "Hi"}, answer("Hello")]}, "unknown_role"),
        8: ({"messages": [{"role": "user"}, answer("Hello")]}, "missing_content"),
        9: ({"messages": [user("Hi")]}, "no_assistant"),
        # line 10 is blank: skipped, as the loader skips it
        11: ({"messages": [user(image("img/missing.png"), "What?"), answer("No.")]}, "image_unreadable"),
        12: ({"messages": [user(image("img/broken.png"), "What?"), answer("No.")]}, "image_unreadable"),
        13: ({"messages": [user(image("img/wide.png"), "What?"), answer("No.")]}, "image_too_large"),
        14: ({"messages": [user(image("img/heavy.png"), "What?"), answer("No.")]}, "image_too_large"),
        15: ({"messages": [user("Draw"), {"role": "assistant", "content": [image("img/red.png")]}]},
             "image_not_in_user"),
        16: ({"messages": [user(*[image("img/red.png")] * 3, "Same?"), answer("Yes.")]}, "too_many_images"),
        17: ({"messages": [user("Tell me a long story."), answer("Once upon a time. " * 10)]}, "too_many_tokens"),
        18: ({"messages": [user(image(data_url), "What colour?"), answer("Green.")]}, None),
        19: ({"messages": [user(image("img/red.png"), image(str(tmp_path / "img" / "blue.png")), "Same colour?"),
                           answer("No."), user("Which is red?"), answer("The first.")]}, None),
        20: ({"input": {"messages": [user(image("img/blue.png"), "Colour?")]},
              "preferred_output": [answer("Blue.")], "non_preferred_output": [answer("Red.")]}, None),
        21: ({"input": {"messages": [user("Colour?")]}, "preferred_output": [answer("Blue."), answer("Red.")],
              "non_preferred_output": [answer("Red.")]}, "bad_preference"),
        22: ({"messages": [user("Hi"), answer("Hello", weight=2)]}, "bad_weight"),
        23: ({"messages": [user(f"{IMAGE_TOKEN}\nWhat is this?"), answer("A square.")]}, "bad_content"),
    }
    text = "\n".join(line if isinstance(line, str) else json.dumps(line)
                     for line, _ in (lines.get(i, ("", None)) for i in range(1, 24)))
    (tmp_path / "data.jsonl").write_text(text + "\n")
    return tmp_path / "data.jsonl", lines


def test_every_bad_line_is_reported_with_its_line_number_and_reason(data, char_tokenizer):
    path, lines = data
    report = validate_file(str(path), char_tokenizer, **LIMITS)
    kinds = {line: reason.split(":")[0] for line, reason in report.errors}
    assert kinds == {i: kind for i, (_, kind) in lines.items() if kind is not None}
    assert set(kinds.values()) <= set(REASONS)
    reasons = dict(report.errors)
    assert reasons[2].startswith("not_json: chat json is not valid JSON")
    assert reasons[7] == "unknown_role: messages[0]: unknown role 'robot' (accepted: system, user, assistant)"
    assert reasons[11] == f"image_unreadable: img/missing.png: no such file ({path.parent / 'img/missing.png'})"
    assert reasons[13] == "image_too_large: image 0 (img/wide.png): 120x120 = 14,400 pixels exceeds the limit " \
                          "of 10,000"
    assert reasons[14] == "image_too_large: img/heavy.png: 150,000 bytes exceeds the limit of 100,000"
    assert reasons[16] == "too_many_images: 3 images, over the limit of 2"
    story = chatml_tokens(("user", "Tell me a long story."), ("assistant", "Once upon a time. " * 10))
    assert story == 222 > MAX_TOKENS
    assert reasons[17] == f"too_many_tokens: 222 tokens (an image counted as {IMAGE_TOKENS}), over the limit of 120"
    assert report.lines == 22 and not report.ok
    assert sum(report.bad_by_reason.values()) == len(report.errors) == 18
    assert report.bad_by_reason["image_unreadable"] == report.bad_by_reason["image_too_large"] == 2


def test_statistics_on_the_good_lines_are_exact(data, char_tokenizer):
    path, _ = data
    report = validate_file(str(path), char_tokenizer, **LIMITS)
    img = IMAGE_TOKEN
    per_example = [
        chatml_tokens(("user", "Hi"), ("assistant", "Hello")),                                         # line 1
        chatml_tokens(("user", f"{img}\nWhat colour?"), ("assistant", "Green.")),                       # line 18
        chatml_tokens(("user", f"{img}\n{img}\nSame colour?"), ("assistant", "No."), ("user", "Which is red?"),
                      ("assistant", "The first.")),                                                     # line 19
        chatml_tokens(("user", f"{img}\nColour?"), ("assistant", "Blue."))
        + chatml_tokens(("user", f"{img}\nColour?"), ("assistant", "Red.")),                            # line 20, both
    ]
    assert per_example == [28, 40 + IMAGE_TOKENS, 82 + 2 * IMAGE_TOKENS, 67 + 2 * IMAGE_TOKENS]
    # in the loss: each answer and its <|im_end|>
    loss = sum(len(a) + 1 for a in ["Hello", "Green.", "No.", "The first.", "Blue.", "Red."])
    assert (report.examples, report.preference_examples, report.images) == (4, 1, 4)
    assert (report.tokens_min, report.tokens_max, report.tokens_total) == (
        min(per_example), max(per_example), sum(per_example))
    assert report.tokens_mean == pytest.approx(sum(per_example) / 4)
    assert report.loss_tokens == loss == 39
    assert report.epoch_tokens == EPOCHS * sum(per_example)

    text = format_report(report)
    assert f"tokens per example: min 28, mean {sum(per_example) / 4:,.1f}, max {max(per_example)}" in text
    assert f"tokens x epochs: {sum(per_example)} x 3 = {3 * sum(per_example)}" in text
    assert "bad lines by reason: not_json 1, not_object 1, no_messages 1, missing_key 1, unknown_key 1, " \
           "unknown_role 1, missing_content 1, bad_content 1, bad_weight 1, no_assistant 1, bad_preference 1, " \
           "image_not_in_user 1, too_many_images 1, image_unreadable 2, image_too_large 2, too_many_tokens 1" in text


def test_without_a_tokenizer_every_other_check_runs(data):
    path, _ = data
    report = validate_file(str(path), None, **LIMITS)
    lines = {line for line, _ in report.errors}
    assert 17 not in lines and 23 not in lines and 2 in lines and 14 in lines  # token checks need a tokenizer
    assert report.examples == 6 and report.tokens_total is None and report.tokens_mean is None
    assert "tokens: not counted (give --tokenizer DIR or --gguf FILE)" in format_report(report)


def test_cli_prints_the_report_and_exits_non_zero_on_errors(data, char_tokenizer, tmp_path):
    path, lines = data
    char_tokenizer.save_pretrained(tmp_path / "tok")
    run = lambda *args: subprocess.run([sys.executable, "-m", "mm.vlm.validate", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, env={**os.environ, **SUBPROCESS_ENV})
    proc = run(str(path), "--tokenizer", str(tmp_path / "tok"), *CLI_LIMITS)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"{path}: 22 lines, 18 bad"
    assert out[1].startswith("line 2: not_json: ") and out[6] == "line 7: unknown_role: messages[0]: unknown role " \
                                                                   "'robot' (accepted: system, user, assistant)"
    assert "examples: 4 (1 preference pairs)" in out and "images: 4" in out and "tokens in the loss: 39" in out

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(lines[i][0]) for i in (1, 19, 20)))  # beside data.jsonl: same img/
    assert main([str(good), *CLI_LIMITS]) == 0
    assert main([str(tmp_path / "absent.jsonl")]) == 2
