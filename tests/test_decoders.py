"""mm.decoders' audio and chat decoders, on tar-style and JSONL-style samples the tests build.

(The image decoders are covered through the CLIP recipe and evaluation tests.)
"""
from __future__ import annotations

import base64
import io
import json
import pickle

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mm.decoders import ChatFormatError, audio_decoder, audio_length, chat_decoder
from mm.media import AudioTooLong, ImageTooLarge, NotAnImage, NotAudio, RefTooLarge, UnreadableRef
from tests.helpers import png_bytes
from tests.zeroshot_fixtures import png_declaring

RED, BLUE = (200, 30, 30), (30, 30, 200)


def wav(seconds: float, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A sine at half scale, as 16-bit WAV bytes."""
    buf = io.BytesIO()
    soundfile.write(buf, 0.5 * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate), rate, format="WAV")
    return buf.getvalue()


def tar_sample(key: str = "000001", **fields) -> dict:
    """A sample as the loader reads it from a tar shard; str fields become bytes, dicts JSON."""
    encoded = {k: json.dumps(v).encode() if isinstance(v, (dict, list)) else v.encode() if isinstance(v, str) else v
               for k, v in fields.items()}
    return {"__key__": key, "__url__": "shard-000000.tar", **{k.replace("_", "."): v for k, v in encoded.items()}}


def manifest_sample(root, record, line: int = 3) -> dict:
    """A sample as the loader reads it from line `line` of root/train.jsonl."""
    return {"__key__": f"train:{line}", "__url__": str(root / "train.jsonl"), "__root__": str(root),
            "json": json.dumps(record).encode()}


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def jpeg_bytes(colour, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [3, H, W], as an image_transform."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def colour_of(image: Image.Image) -> tuple:
    return image.getpixel((image.width // 2, image.height // 2))


@pytest.fixture
def clips(tmp_path):
    """A manifest folder: clips/one.wav (1 s at 44.1 kHz) and clips/two.wav (2 s at 16 kHz)."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "one.wav").write_bytes(wav(1.0, 44100))
    (tmp_path / "clips" / "two.wav").write_bytes(wav(2.0))
    return tmp_path


# ---------------------------------------------------------------- audio_decoder

def test_audio_decoder_on_a_tar_sample():
    out = audio_decoder()(tar_sample(flac=wav(1.0, 44100), txt=" hello world\n"))
    assert out["audio"].dtype == torch.float32 and out["audio"].shape == (16000,)
    assert out["duration"] == pytest.approx(1.0) and audio_length(out) == out["duration"]
    assert out["text"] == "hello world" and out["language"] is None
    peak = torch.fft.rfft(out["audio"]).abs().argmax().item()  # 1 Hz bins over 1 s
    assert abs(peak - 440) <= 1


@pytest.mark.parametrize("fields, text, language", [
    ({"txt": "hi", "json": {"language": "fr"}}, "hi", "fr"),
    ({"json": {"text": "bonjour", "language": "fr"}}, "bonjour", "fr"),
    ({"json": {"text": "hallo", "lang": "de"}}, "hallo", "de"),
    ({"caption": "hola", "lang": "es\n"}, "hola", "es"),
    ({"text": "ciao", "language": "it"}, "ciao", "it"),
    ({"txt": "from the field", "json": {"text": "from the json"}}, "from the field", None),
    ({"txt": "x", "json": {"language": ""}}, "x", None),
])
def test_audio_decoder_finds_transcript_and_language_in_fields_or_json(fields, text, language):
    out = audio_decoder()(tar_sample(wav=wav(0.5), **fields))
    assert (out["text"], out["language"]) == (text, language)


def test_audio_decoder_passes_checked_segments():
    segs = [{"start": 0.0, "end": 0.4, "text": " one"}, {"start": 0.5, "end": 1.0, "text": "two "}]
    out = audio_decoder()(tar_sample(flac=wav(1.0), json={"text": "one two", "segments": segs}))
    assert out["segments"] == [{"start": 0.0, "end": 0.4, "text": "one"}, {"start": 0.5, "end": 1.0, "text": "two"}]
    assert "segments" not in audio_decoder()(tar_sample(flac=wav(1.0), json={"text": "x"}))


@pytest.mark.parametrize("segments, match", [
    ([], "non-empty list"),
    ([{"start": 0.0, "end": 0.5}], "needs start, end and text"),
    ([{"start": "0", "end": 0.5, "text": "a"}], "non-numeric"),
    ([{"start": 0.5, "end": 0.4, "text": "a"}], "out of order"),
    ([{"start": 0.0, "end": 0.6, "text": "a"}, {"start": 0.3, "end": 0.9, "text": "b"}], "out of order"),
    ([{"start": 0.0, "end": 1.5, "text": "a"}], "outside"),
])
def test_audio_decoder_refuses_bad_segments(segments, match):
    with pytest.raises(ValueError, match=match):
        audio_decoder()(tar_sample(flac=wav(1.0), json={"text": "a", "segments": segments}))


def test_audio_decoder_on_manifest_lines(clips):
    decode = audio_decoder()
    out = decode(manifest_sample(clips, {"audio": "clips/one.wav", "text": "one", "language": "en"}))
    assert out["audio"].shape == (16000,) and (out["text"], out["language"]) == ("one", "en")
    nemo = decode(manifest_sample(clips, {"audio_filepath": "clips/two.wav", "duration": 2.0, "text": "two"}))
    assert nemo["audio"].shape == (32000,) and nemo["duration"] == pytest.approx(2.0) and nemo["language"] is None
    absolute = decode(manifest_sample(clips, {"audio": str(clips / "clips" / "two.wav"), "text": "two"}))
    assert torch.equal(absolute["audio"], nemo["audio"])
    inline = decode(manifest_sample(clips, {"audio": data_url(wav(0.25), "audio/wav"), "text": "inline"}))
    assert inline["audio"].shape == (4000,)


def test_declared_duration_over_the_limit_is_refused_without_opening_the_file(clips):
    decode = audio_decoder(max_seconds=30)
    line = {"audio_filepath": "clips/not_there.wav", "duration": 45.0, "text": "long"}
    with pytest.raises(AudioTooLong, match=r"sample train:3: declared duration 45 s exceeds the limit of 30 s"):
        decode(manifest_sample(clips, line))  # a FileNotFoundError would mean it looked for the file
    with pytest.raises(FileNotFoundError, match=r"sample train:3: clips/not_there\.wav: no such file"):
        decode(manifest_sample(clips, {**line, "duration": 5.0}))  # under the limit, it does look
    with pytest.raises(ValueError, match="shorter than the minimum"):
        audio_decoder(min_seconds=1.0)(manifest_sample(clips, {**line, "duration": 0.5}))


@pytest.mark.parametrize("fields", [{"txt": "  \n"}, {"json": {"text": ""}}, {"txt": "", "json": {"text": "x"}}])
def test_empty_transcript_is_a_bad_sample(fields):
    with pytest.raises(ValueError, match="sample 000001: empty transcript"):
        audio_decoder()(tar_sample(wav=wav(0.5), **fields))


def test_audio_too_long_or_too_short_once_decoded(clips):
    with pytest.raises(AudioTooLong, match=r"sample 000001 \(field wav\): 2\.0 s exceeds the limit of 1\.5 s"):
        audio_decoder(max_seconds=1.5)(tar_sample(wav=wav(2.0), txt="x"))
    with pytest.raises(AudioTooLong, match=r"clips/two\.wav"):
        audio_decoder(max_seconds=1.5)(manifest_sample(clips, {"audio": "clips/two.wav", "text": "x"}))
    with pytest.raises(ValueError, match=r"0\.50 s is shorter than the minimum of 1 s"):
        audio_decoder(min_seconds=1.0)(tar_sample(wav=wav(0.5), txt="x"))
    assert audio_decoder(max_seconds=None)(tar_sample(wav=wav(2.0), txt="x"))["duration"] == pytest.approx(2.0)


@pytest.mark.parametrize("sample, error, match", [
    (tar_sample(txt="x"), KeyError,
     r"no audio \(flac/wav/ogg/opus/mp3 field, or audio/audio_filepath in json\) in sample 000001"),
    (tar_sample(wav=wav(0.5)), KeyError, r"no transcript .* in sample 000001"),
    (tar_sample(wav=b"not audio at all" * 10, txt="x"), NotAudio, r"sample 000001 \(field wav\): not audio"),
    (tar_sample(wav=wav(0.5), txt=b"\xff\xfe"), ValueError, r"sample 000001: field 'txt' is not UTF-8"),
    (tar_sample(wav=wav(0.5), json="[1, 2]"), ValueError, r"sample 000001: json is a list"),
    (tar_sample(wav=wav(0.5), json="{oops"), ValueError, r"sample 000001: json is not valid JSON"),
    (tar_sample(wav=wav(0.5), json={"text": 7}), ValueError, r"\"text\" is a int"),
    (tar_sample(wav=wav(0.5), json={"text": "x", "duration": "long"}), ValueError, r"\"duration\" must be a number"),
    (tar_sample(json={"text": "x", "audio": "clips/a.wav"}), UnreadableRef, r"sample 000001: .*no folder .*nor a field"),
])
def test_audio_decoder_bad_samples_name_the_sample(sample, error, match):
    with pytest.raises(error, match=match):
        audio_decoder()(sample)


def test_audio_decoder_refuses_oversize_references(clips):
    with pytest.raises(RefTooLarge, match="sample train:3"):
        audio_decoder(max_bytes=1000)(manifest_sample(clips, {"audio": "clips/one.wav", "text": "x"}))


# ---------------------------------------------------------------- chat_decoder: what it returns

def test_sft_with_string_content(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."}]}
    out = chat_decoder()(manifest_sample(tmp_path, record))
    assert out == {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}], "weight": 0},
        {"role": "user", "content": [{"type": "text", "text": "Hi?"}], "weight": 0},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}], "weight": 1}], "images": []}


def test_sft_parts_with_a_relative_path_an_absolute_path_a_file_url_and_a_data_url(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png_bytes(RED))
    (tmp_path / "imgs" / "blue.png").write_bytes(png_bytes(BLUE))
    urls = ["imgs/red.png", str(tmp_path / "imgs" / "blue.png"), (tmp_path / "imgs" / "red.png").as_uri(),
            data_url(png_bytes(BLUE))]
    parts = [{"type": "text", "text": "Which colours?"}] + [
        {"type": "image_url", "image_url": {"url": u, "detail": d}} for u, d in zip(urls, ["low", "high", "auto", "low"])]
    record = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Red, blue, red, blue."}]}
    out = chat_decoder()(manifest_sample(tmp_path, record))
    assert out["messages"][0]["content"] == [{"type": "text", "text": "Which colours?"}] + [
        {"type": "image", "index": i} for i in range(4)]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in out["images"])
    assert [colour_of(im) for im in out["images"]] == [RED, BLUE, RED, BLUE]


def test_image_transform_is_applied_to_each_image(tmp_path):
    record = {"messages": [{"role": "user", "content": [image_part(data_url(png_bytes(RED, 20)))]},
                           {"role": "assistant", "content": "red"}]}
    out = chat_decoder(image_transform=to_tensor)(manifest_sample(tmp_path, record))
    assert out["images"][0].shape == (3, 20, 20) and out["images"][0][:, 10, 10].tolist() == list(RED)


def test_a_tar_sample_url_may_name_another_field_of_the_sample():
    record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img0.jpg"}},
                                                        {"type": "text", "text": "and"},
                                                        {"type": "image_url", "image_url": {"url": "img1.png"}}]},
                           {"role": "assistant", "content": "red and blue"}]}
    out = chat_decoder()(tar_sample(json=record, img0_jpg=jpeg_bytes(RED), img1_png=png_bytes(BLUE)))
    assert [c["type"] for c in out["messages"][0]["content"]] == ["image", "text", "image"]
    assert np.abs(np.subtract(colour_of(out["images"][0]), RED)).max() <= 8  # JPEG
    assert colour_of(out["images"][1]) == BLUE
    fields = r"nor a field of the sample, which has \['img0\.jpg', 'json'\]"
    with pytest.raises(UnreadableRef, match=rf"sample 000001: img1\.png: .*{fields}"):
        chat_decoder()(tar_sample(json=record, img0_jpg=jpeg_bytes(RED)))


def test_weights_are_kept_and_a_trailing_user_message_is_accepted(tmp_path):
    record = {"messages": [{"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris", "weight": 0},
                           {"role": "user", "content": "More sarcastic?"},
                           {"role": "assistant", "content": "Paris, obviously.", "weight": 1, "name": "marv"},
                           {"role": "user", "content": "Thanks."}]}  # OpenAI does not require the assistant last
    out = chat_decoder()(manifest_sample(tmp_path, record))
    assert [m["weight"] for m in out["messages"]] == [0, 0, 0, 1, 0]
    assert out["messages"][3]["name"] == "marv" and "name" not in out["messages"][1]


def test_preference_lines(tmp_path):
    record = {"input": {"messages": [{"role": "system", "content": "Describe images."},
                                     {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                  image_part(data_url(png_bytes(RED)))]}],
                        "tools": [], "parallel_tool_calls": True},
              "preferred_output": [{"role": "assistant", "content": "A red square."}],
              "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "A blue circle."}]}]}
    out = chat_decoder()(manifest_sample(tmp_path, record))
    assert set(out) == {"prompt", "chosen", "rejected", "images"}
    assert [(m["role"], m["weight"]) for m in out["prompt"]] == [("system", 0), ("user", 0)]
    assert out["prompt"][1]["content"][1] == {"type": "image", "index": 0} and colour_of(out["images"][0]) == RED
    assert out["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}], "weight": 1}]
    assert out["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": "A blue circle."}], "weight": 1}]


def test_chat_decoders_pickle_for_dataloader_workers(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    for decode in (chat_decoder(image_transform=to_tensor), chat_decoder(), audio_decoder()):
        pickle.loads(pickle.dumps(decode))
    assert pickle.loads(pickle.dumps(chat_decoder()))(manifest_sample(tmp_path, record))["messages"][1]["weight"] == 1


# ---------------------------------------------------------------- chat_decoder: what it refuses

USER, ANSWER = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
IMAGE = image_part("imgs/red.png")


def sft(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


def pref(prompt=(USER,), preferred=(ANSWER,), non_preferred=(ANSWER,)) -> dict:
    return {"input": {"messages": list(prompt)}, "preferred_output": list(preferred),
            "non_preferred_output": list(non_preferred)}


@pytest.mark.parametrize("record, match", [
    ([USER, ANSWER], "the line is a JSON list, not an object"),
    ({"prompt": "Hi", "completion": "Hello"}, "neither \"messages\" \\(supervised\\) nor \"input\""),
    (sft(), "messages must be a non-empty list of messages"),
    ({"messages": "Hi"}, "messages must be a non-empty list of messages"),
    (sft("Hi", ANSWER), r"messages\[0\]: a message must be an object, got str"),
    (sft({"role": "tool", "content": "42"}, ANSWER),
     r"messages\[0\]: unknown role 'tool' \(accepted: system, user, assistant\)"),
    (sft({"content": "Hi"}, ANSWER), r"messages\[0\]: unknown role None"),
    (sft(USER, {"role": "assistant", "content": "x", "tool_calls": []}), r"messages\[1\]: unsupported key\(s\) tool_calls"),
    (sft(USER), "no assistant message: nothing to learn"),
    (sft({"role": "system", "content": "Be brief."}, USER), "no assistant message"),
    (sft(USER, {**ANSWER, "weight": 0}, USER, {**ANSWER, "weight": 0}),
     "every assistant message has weight 0: nothing to learn"),
    (sft(USER, {**ANSWER, "weight": 2}), r"messages\[1\]: weight must be 0 or 1, got 2"),
    (sft(USER, {**ANSWER, "weight": 0.5}), "weight must be 0 or 1, got 0.5"),
    (sft(USER, {**ANSWER, "weight": True}), "weight must be 0 or 1, got True"),
    (sft(USER, {**ANSWER, "weight": "1"}), "weight must be 0 or 1, got '1'"),
    (sft({**USER, "weight": 1}, ANSWER), r"messages\[0\]: weight is only for assistant messages, not user"),
    (sft({"role": "user", "content": 42}, ANSWER), r"content must be a string or a list of parts, got int"),
    (sft({"role": "user", "content": {"type": "text", "text": "Hi"}}, ANSWER), "got dict"),
    (sft({"role": "user"}, ANSWER), r"messages\[0\]: no content"),
    (sft({"role": "user", "content": " \n"}, ANSWER), r"messages\[0\]: empty content"),
    (sft({"role": "user", "content": []}, ANSWER), r"messages\[0\]: empty content"),
    (sft(USER, {"role": "assistant", "content": ""}), r"messages\[1\]: empty content"),
    (sft({"role": "user", "content": [{"type": "text", "text": ""}]}, ANSWER),
     r"content\[0\]: a text part needs a non-empty"),
    (sft({"role": "user", "content": ["Hi"]}, ANSWER), r"content\[0\]: a content part must be an object"),
    (sft({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, ANSWER),
     r"messages\[0\]\.content\[0\]: unknown part type 'input_audio' \(accepted: text, image_url\)"),
    (sft(USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}), "unknown part type 'refusal'"),
    (sft(USER, {"role": "assistant", "content": [IMAGE]}),
     r"messages\[1\]\.content\[0\]: images are accepted in user messages only, not in assistant"),
    (sft({"role": "system", "content": [IMAGE]}, USER, ANSWER), "not in system messages"),
    (sft({"role": "user", "content": [{"type": "image_url", "image_url": "imgs/red.png"}]}, ANSWER),
     "an image_url part needs"),
    (sft({"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}, ANSWER), "an image_url part needs"),
    (sft({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png", "detail": "max"}}]}, ANSWER),
     "detail must be one of auto, low, high, got 'max'"),
    (sft(USER, ANSWER, tools=[{"type": "function", "function": {"name": "f"}}]),
     "tools: tool definitions are not supported"),
    (pref(preferred=()), "\"preferred_output\" must be a list of exactly one assistant message"),
    (pref(preferred=(ANSWER, ANSWER)), "\"preferred_output\" must be a list of exactly one assistant message"),
    (pref(non_preferred=(USER,)), "\"non_preferred_output\" must be a list of exactly one assistant message"),
    ({"input": {"messages": [USER]}, "preferred_output": [ANSWER]}, "\"non_preferred_output\" must be a list"),
    ({**pref(), "non_preferred_output": ANSWER}, "\"non_preferred_output\" must be a list"),
    (pref(non_preferred=({**ANSWER, "content": [IMAGE]},)),
     r"non_preferred_output\[0\]\.content\[0\]: images are accepted in user messages only"),
    ({**pref(), "input": [USER]}, "\"input\" must be an object holding \"messages\""),
    (pref(prompt=()), "input.messages must be a non-empty list"),
    (pref(prompt=(USER, ANSWER)), "the last input message must be a user message"),
    (pref(prompt=({"role": "critic", "content": "x"},)), r"input\.messages\[0\]: unknown role 'critic'"),
    (pref(preferred=({**ANSWER, "weight": 1},)), r"preferred_output\[0\]: weight belongs to supervised data"),
    ({**pref(), "input": {"messages": [USER], "tools": [{"type": "function"}]}},
     "input.tools: tool definitions are not supported"),
])
def test_chat_format_errors_name_the_sample_and_the_place(tmp_path, record, match):
    with pytest.raises(ChatFormatError, match=f"^sample train:3: .*{match}"):
        chat_decoder()(manifest_sample(tmp_path, record))


def test_the_whole_line_is_checked_before_any_image_is_fetched(tmp_path):
    record = sft({"role": "user", "content": [IMAGE]}, {"role": "robot", "content": "x"})  # imgs/red.png does not exist
    with pytest.raises(ChatFormatError, match="unknown role 'robot'"):
        chat_decoder()(manifest_sample(tmp_path, record))


def test_too_many_images_are_refused_before_fetching(tmp_path):
    record = sft({"role": "user", "content": [IMAGE, IMAGE, IMAGE]}, ANSWER)  # not on disk: a fetch would fail differently
    with pytest.raises(ChatFormatError, match="sample train:3: 3 images, over the limit of 2"):
        chat_decoder(max_images=2)(manifest_sample(tmp_path, record))


def test_unparseable_lines_are_bad_samples(tmp_path):
    with pytest.raises(ValueError, match="sample train:3: chat json is not valid JSON"):
        chat_decoder()({**manifest_sample(tmp_path, {}), "json": b"{\"messages\": ["})
    with pytest.raises(KeyError, match="no chat json"):
        chat_decoder()(tar_sample(txt="hello"))


def image_line(url: str) -> dict:
    return sft({"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(url)]}, ANSWER)


@pytest.mark.parametrize("url, error, match", [
    ("imgs/missing.png", FileNotFoundError, r"sample train:3: imgs/missing\.png: no such file"),
    ("data:image/png;base64,iVBORw0K!!!", UnreadableRef, "sample train:3: .*bad base64"),
    ("data:image/png;base64" + "A" * 100, UnreadableRef, "malformed data: URL"),
    ("ftp://example.com/a.png", UnreadableRef, "unsupported URL scheme 'ftp'"),
    (data_url(b"GIF89a but not really"), NotAnImage, r"sample train:3: image 0 \(data:image/png;base64,.*\): not an image"),
    (data_url(png_declaring(8000, 8000, rows=1)), ImageTooLarge,  # truncated: only the header is there
     r"sample train:3: image 0 .*: 8000x8000 = 64,000,000 pixels exceeds the limit of 50,000,000"),
])
def test_chat_image_failures_are_bad_samples_naming_the_sample(tmp_path, url, error, match):
    with pytest.raises(error, match=match):
        chat_decoder()(manifest_sample(tmp_path, image_line(url)))


def test_a_decompression_bomb_in_a_tar_field_is_refused_from_its_header():
    bomb = png_declaring(4000, 4000)  # 16 MP in a few KB of PNG
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge, match=r"sample 000001: image 0 \(img0\.png\): 4000x4000"):
        chat_decoder(max_pixels=1_000_000)(tar_sample(json=image_line("img0.png"), img0_png=bomb))


def test_image_bytes_over_the_limit_are_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png_bytes(RED))
    size = len(png_bytes(RED))
    with pytest.raises(RefTooLarge, match="sample train:3"):
        chat_decoder(max_image_bytes=size - 1)(manifest_sample(tmp_path, image_line("imgs/red.png")))
    with pytest.raises(RefTooLarge, match=r"sample 000001: field 'img0\.png'"):
        chat_decoder(max_image_bytes=size - 1)(tar_sample(json=image_line("img0.png"), img0_png=png_bytes(RED)))
    assert len(chat_decoder(max_image_bytes=size)(manifest_sample(tmp_path, image_line("imgs/red.png")))["images"]) == 1
