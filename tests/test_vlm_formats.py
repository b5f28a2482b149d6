"""mm.vlm.formats: LLaVA and ShareGPT records become OpenAI lines that mm.decoders.chat_decoder accepts,
each image where its marker was; bad records fail with a reason; the file converter and its CLI."""
from __future__ import annotations

import json

import pytest

from mm.decoders import ChatFormatError, chat_decoder
from mm.vlm.formats import convert_file, detect_format, main, to_openai
from tests.helpers import png_bytes

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


@pytest.fixture
def images(tmp_path):
    """tmp_path/images/{red,blue,green}.png."""
    (tmp_path / "images").mkdir()
    for name, colour in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        (tmp_path / "images" / f"{name}.png").write_bytes(png_bytes(colour))
    return tmp_path / "images"


def decode_line(line: dict, root) -> dict:
    """What training makes of the line, were it in a manifest in `root`."""
    sample = {"__key__": "train:1", "__url__": str(root / "train.jsonl"), "__root__": str(root),
              "json": json.dumps(line).encode()}
    return chat_decoder()(sample)


def layout(decoded: dict) -> list[tuple[str, list]]:
    """(role, [text or ("image", colour)]) per message: what is where, in a form a test can compare."""
    colour = lambda i: decoded["images"][i].getpixel((8, 8))  # noqa: E731
    return [(m["role"], [p["text"] if p["type"] == "text" else ("image", colour(p["index"])) for p in m["content"]])
            for m in decoded["messages"]]


LLAVA = {"id": "000000033471", "image": ["red.png", "blue.png"], "conversations": [
    {"from": "human", "value": "<image>\nWhat colour is this square?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And in this one, <image>\nwhat is there?"},
    {"from": "gpt", "value": "A blue square."}]}


def test_llava_record_puts_each_image_where_its_marker_was(tmp_path, images):
    assert detect_format(LLAVA) == "llava"
    line = to_openai(LLAVA, "auto", image_root="images")
    assert line["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": "images/red.png"}}
    assert layout(decode_line(line, tmp_path)) == [
        ("user", [("image", RED), "What colour is this square?"]),
        ("assistant", ["It is red."]),
        ("user", ["And in this one,", ("image", BLUE), "what is there?"]),
        ("assistant", ["A blue square."])]


def test_llava_image_without_a_marker_goes_first_in_the_first_user_turn(tmp_path, images):
    record = {"image": "green.png", "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "Green."}]}
    assert layout(decode_line(to_openai(record, "llava", str(images)), tmp_path)) == [
        ("system", ["Answer briefly."]), ("user", [("image", GREEN), "What colour?"]), ("assistant", ["Green."])]


@pytest.mark.parametrize("record", [
    {"conversations": [{"from": "human", "value": "<image>Who is this?"}, {"from": "gpt", "value": "A red square."}],
     "images": ["red.png"], "system": "You describe images."},
    # LLaMA-Factory's sharegpt layout (mllm_demo.json): role/content under "messages"
    {"messages": [{"role": "user", "content": "<image>Who is this?"},
                  {"role": "assistant", "content": "A red square."}],
     "images": ["red.png"], "system": "You describe images."},
])
def test_sharegpt_records(tmp_path, images, record):
    assert detect_format(record) == "sharegpt"
    assert layout(decode_line(to_openai(record, image_root="images"), tmp_path)) == [
        ("system", ["You describe images."]), ("user", [("image", RED), "Who is this?"]),
        ("assistant", ["A red square."])]


def test_openai_lines_pass_through_and_urls_are_kept(tmp_path, images):
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    preference = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
                  "preferred_output": [{"role": "assistant", "content": "Hello"}],
                  "non_preferred_output": [{"role": "assistant", "content": "Go away"}]}
    assert detect_format(line) == detect_format(preference) == "openai"
    assert to_openai(line) is line and to_openai(preference, "openai") is preference
    url = "file://" + str(images / "blue.png")
    record = {"image": [url, str(images / "red.png")],
              "conversations": [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "No."}]}
    out = to_openai(record, image_root="elsewhere")
    assert [p["image_url"]["url"] for p in out["messages"][0]["content"][:2]] == [url, str(images / "red.png")]
    assert layout(decode_line(out, tmp_path))[0] == ("user", [("image", BLUE), ("image", RED), "Same?"])


@pytest.mark.parametrize("record, fmt, reason", [
    ([1, 2], "auto", r"a record must be a JSON object, got list"),
    ({"id": "x"}, "auto", r"not a chat record: no messages, conversations or input \(keys: \['id'\]\)"),
    ({"image": "a.png", "conversations": []}, "auto", r"\"conversations\" must be a non-empty list of turns"),
    ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> one"},
                                                     {"from": "gpt", "value": "x"}]},
     "auto", r"1 <image> marker\(s\) for 2 image\(s\)"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]},
     "sharegpt", r"1 <image> marker\(s\) for 0 image\(s\)"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]},
     "auto", r"turn 1 \(assistant\): an <image> marker; images go in user turns"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"}]},
     "auto", r"turn 1: unknown speaker 'observation' \(accepted: human, user, gpt, assistant, system\)"),
    ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]},
     "auto", r"turn 0 \(human\): empty text"),
    ({"conversations": [{"from": "human", "value": [{"type": "text"}]}]}, "auto",
     r"turn 0 \(human\): the text must be a string, got list"),
    ({"image": {"path": "a.png"}, "conversations": [{"from": "human", "value": "hi"}]}, "auto",
     r"\"image\" must be a path or a list of paths"),
    ({"image": "a.png", "conversations": [{"from": "gpt", "value": "hi"}]}, "auto",
     r"1 image\(s\) and no user turn to put them in"),
])
def test_bad_records_raise_with_the_reason(record, fmt, reason):
    with pytest.raises(ChatFormatError, match=reason):
        to_openai(record, fmt)


def test_convert_file_resolves_images_from_the_output_folder_and_lists_failures(tmp_path, images, capsys):
    src = tmp_path / "llava" / "data.json"
    src.parent.mkdir()
    bad = {"image": "red.png", "conversations": [{"from": "gpt", "value": "hi"}]}
    src.write_text(json.dumps([LLAVA, bad, {**LLAVA, "image": ["green.png", "red.png"]}]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stats = convert_file(str(src), str(out_dir / "train.jsonl"), image_root=str(images))
    assert (stats.written, stats.unit) == (2, "record")
    assert stats.failed == [(2, "1 image(s) and no user turn to put them in")]
    lines = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    assert lines[0]["messages"][0]["content"][0]["image_url"]["url"] == "../images/red.png"  # portable: relative
    assert layout(decode_line(lines[1], out_dir))[2][1][1] == ("image", RED)

    jsonl = tmp_path / "sharegpt.jsonl"  # JSON lines, images relative to the source's own folder by default
    share = {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Blue."}],
             "images": ["images/blue.png"]}
    jsonl.write_text(json.dumps(share) + "\n\nnot json\n" + json.dumps(share) + "\n")
    assert main([str(jsonl), str(out_dir / "share.jsonl"), "--format", "sharegpt"]) == 1
    printed = capsys.readouterr().out
    assert f"wrote 2 lines to {out_dir / 'share.jsonl'}; 1 lines failed" in printed
    assert "  line 3: not valid JSON (Expecting value: line 1 column 1 (char 0))" in printed
    first = json.loads((out_dir / "share.jsonl").read_text().splitlines()[0])
    assert layout(decode_line(first, out_dir))[0] == ("user", [("image", BLUE), "Colour?"])
    assert main([str(out_dir / "share.jsonl"), str(out_dir / "again.jsonl")]) == 0  # OpenAI lines: as they are
    assert (out_dir / "again.jsonl").read_text() == (out_dir / "share.jsonl").read_text()
    assert not list(out_dir.glob("*.tmp"))
