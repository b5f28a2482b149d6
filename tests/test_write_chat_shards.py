"""data_tools.write_chat_shards: chat lines become tar samples with their images embedded, which the loader
and chat_decoder read back to the same chats; bad lines are skipped and counted with their line numbers."""
import base64
import collections
import io
import json

import pytest
from PIL import Image

from data_tools.write_chat_shards import image_parts, main, write_chat_shards
from mm.decoders import chat_decoder
from mm.shards import read_samples


def image_bytes(colour, fmt, size=(12, 8)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (1, 2, 3))  # not uniform: a flipped or resized image would differ
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def sft(*user_parts, answer="ok"):
    return {"messages": [{"role": "user", "content": [*user_parts, {"type": "text", "text": "what is this?"}]},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture
def chat_jsonl(tmp_path):
    """A chat JSONL with good lines (two images in one, a data: URL, a repeated image, a preference line, a
    text-only line) and bad ones, each kind of failure once; returns (path, {line number: expected reason})."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(image_bytes((200, 30, 30), "PNG"))
    (tmp_path / "imgs" / "blue.png").write_bytes(image_bytes((30, 30, 200), "JPEG"))  # a JPEG named .png
    (tmp_path / "imgs" / "junk.png").write_bytes(b"not an image at all")
    data_url = "data:image/webp;base64," + base64.b64encode(image_bytes((30, 200, 30), "WEBP")).decode()
    absolute = str(tmp_path / "imgs" / "red.png")
    lines = [
        json.dumps(sft(image("imgs/red.png"), image("imgs/blue.png"), answer="red, then blue")),  # 1
        json.dumps(sft(image(data_url), answer="green")),  # 2
        "{\"messages\": [",  # 3: invalid JSON
        "",  # 4: blank, skipped like the loader does
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),  # 5: bad format
        json.dumps(sft(image("imgs/missing.png"))),  # 6: missing image
        json.dumps(sft(image("imgs/junk.png"))),  # 7: unreadable image
        json.dumps({"input": {"messages": [{"role": "user", "content": [image("imgs/blue.png"),
                                                                          {"type": "text", "text": "colour?"}]}]},
                    "preferred_output": [{"role": "assistant", "content": "blue"}],
                    "non_preferred_output": [{"role": "assistant", "content": "red"}]}),  # 8: preference
        json.dumps(sft(image(absolute), image("imgs/red.png"), image("file://" + absolute))),  # 9: one image, 3 urls
        json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}),  # 10
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {3: "invalid_json", 5: "bad_format", 6: "missing_image", 7: "unreadable_image"}


def decoded_lines(path):
    """{line number: chat} of the JSONL read as a manifest, for its good lines."""
    out, decode = {}, chat_decoder()
    for sample in read_samples([str(path)], collections.Counter()):
        try:
            out[int(sample["__key__"].split(":")[1])] = decode(sample)
        except (ValueError, FileNotFoundError):
            pass
    return out


def same_chat(a, b):
    return ({k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}
            and [(i.size, i.tobytes()) for i in a["images"]] == [(i.size, i.tobytes()) for i in b["images"]])


def test_shards_read_back_to_the_same_chats_and_bad_lines_are_counted(chat_jsonl, tmp_path):
    path, bad = chat_jsonl
    out = tmp_path / "shards"
    stats = write_chat_shards(str(path), str(out), per_shard=2, num_workers=2)

    assert stats["lines"] == 9 and stats["written"] == 5 and stats["failed"] == 4
    assert stats["failures"] == {reason: 1 for reason in bad.values()}
    assert stats["failed_lines"] == {reason: [line] for line, reason in bad.items()}
    assert {(e["line"], e["reason"]) for e in stats["examples"]} == set(bad.items())
    assert stats["images"] == 5  # 2 + 1 + 0 (text only) + 1 (preference) + 1 (three urls, one file)
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 2 + 2 + 1

    counts = collections.Counter()
    samples = list(read_samples([str(out / s) for s in stats["shards"]], counts))
    assert counts["bad_shards"] == 0
    by_line = {int(s["__key__"]): s for s in samples}
    assert sorted(by_line) == [1, 2, 8, 9, 10]
    fields = {line: sorted(k for k in s if not k.startswith("__")) for line, s in by_line.items()}
    assert fields[1] == ["img0.png", "img1.jpg", "json"]  # extension from the bytes, not the url
    assert fields[2] == ["img0.webp", "json"]
    assert fields[9] == ["img0.png", "json"] and fields[10] == ["json"]
    assert by_line[1]["img1.jpg"] == (path.parent / "imgs" / "blue.png").read_bytes()  # original bytes
    urls = [p["image_url"]["url"] for p in image_parts(json.loads(by_line[9]["json"]))]
    assert urls == ["img0.png"] * 3

    originals, decode = decoded_lines(path), chat_decoder()
    assert sorted(originals) == sorted(by_line)
    for line, sample in by_line.items():
        assert same_chat(decode(sample), originals[line]), line
    assert decode(by_line[8])["chosen"][0]["content"] == [{"type": "text", "text": "blue"}]


def test_rerun_is_byte_identical_and_replaces_old_shards(chat_jsonl, tmp_path):
    path, _ = chat_jsonl
    out = tmp_path / "shards"
    write_chat_shards(str(path), str(out), per_shard=1, num_workers=1)
    assert len(list(out.glob("shard-*.tar"))) == 5
    first = (out / "shard-000000.tar").read_bytes()
    stats = write_chat_shards(str(path), str(out), per_shard=10, num_workers=3)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == stats["shards"] == ["shard-000000.tar"]
    write_chat_shards(str(path), str(out), per_shard=1, num_workers=1)
    assert (out / "shard-000000.tar").read_bytes() == first


def test_cli_writes_and_fails_when_nothing_is_written(chat_jsonl, tmp_path, capsys):
    path, _ = chat_jsonl
    main([str(path), f"--out={tmp_path / 'cli'}", "--per_shard=3", "--num_workers=1"])
    assert "wrote 5 lines (5 images) in 2 shards" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nonsense\n[1, 2]\n")
    with pytest.raises(SystemExit, match="nothing written"):
        main([str(bad), f"--out={tmp_path / 'none'}"])
    stats = json.loads((tmp_path / "none" / "stats.json").read_text())
    assert stats["failed_lines"] == {"invalid_json": [1], "bad_format": [2]} and stats["shards"] == []
    assert not list((tmp_path / "none").glob("*.tar"))
