"""mm.vlm.inference on the shared tiny trained run: batched, single and streamed answers agree, every generated
token is the model's own greedy choice, reply fields are exact, bad input fails before generation, and every
way of naming an image reads the same pixels."""
import base64
import struct
import zlib

import pytest
import torch

from mm.decoders import ChatFormatError
from mm.media import ImageTooLarge, NotAnImage
from mm.vlm.inference import PromptTooLong
from tests.helpers import one_torch_thread  # noqa: F401 - a fixture
from tests.vlm_fixtures import trained_vlm, vision_chat, vlm_data  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(question: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*(image(u) for u in urls), {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def conversations(vlm_data):
    """Prompts of different lengths and kinds (left padding differs in a batch): images, none, two, multi-turn."""
    png = [str(vlm_data / "images" / "heldout" / f"{i:06d}.png") for i in range(3)]
    return [
        ask("What colour is the star?", png[0]),
        [{"role": "user", "content": "Hello, how many objects are in a scene usually?"}],
        ask("Describe the image.", png[1]),
        [*ask("Is there a red circle?", png[2]), {"role": "assistant", "content": "no"},
         {"role": "user", "content": "Where is the green square?"}],
        ask("Which of these has more objects?", png[0], png[1]),
    ]


@pytest.fixture
def never_stopping(vision_chat, monkeypatch):
    """The chat with a stop token the model never emits (the <image> token): every answer runs to
    max_new_tokens, so answers are long and differ between prompts."""
    monkeypatch.setattr(vision_chat, "stop_ids", [vision_chat.model.image_token_id])
    return vision_chat


# ---------------------------------------------------------------- answers agree

def test_chat_batch_equals_chat_per_conversation(vision_chat, conversations):
    batch = vision_chat.chat_batch(conversations, max_new_tokens=12)
    assert batch == [vision_chat.chat(m, max_new_tokens=12) for m in conversations]
    # the trained model ends its answers about images; the text-only question (it never saw one) may ramble
    assert all(r.finish_reason == "stop" and r.text for k, r in enumerate(batch) if k != 1), batch
    assert batch[1].text and batch[1].finish_reason in ("stop", "length")


def generate(chat, conversations, max_new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """What chat_batch's generate() call gives for a left-padded batch of conversations: the new token ids
    (special tokens included) and the logits of every step [B, max_new_tokens, vocab]."""
    ids, pixels, mask = chat._batch([chat.prepare(m) for m in conversations])
    out = chat.model.generate(ids, pixels, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                              **chat._generate_kwargs(max_new_tokens, 0.0, 1.0))
    return out.sequences.tolist(), torch.stack(out.logits, 1)


@torch.no_grad()
def test_generation_starts_from_the_logits_of_a_full_forward(never_stopping, conversations):
    """What chat generates from equals the model's own forward on the prompt: with static image tokens (the
    recipe's default for a tiny LM) too, which a generate on the LM alone, given the embeddings, would lose."""
    assert never_stopping.model.static_image_tokens
    for messages in conversations:
        ids, pixels, _ = never_stopping._batch([never_stopping.prepare(messages)])
        expected, _ = never_stopping.model(ids, pixels)
        _, logits = generate(never_stopping, [messages], 1)
        torch.testing.assert_close(logits[0, 0], expected[0, -1], rtol=0, atol=1e-4)


def test_a_left_padded_batch_gives_each_conversation_its_own_logits(never_stopping, conversations):
    """The answers of this small model are alike, so compare what decides them: every step's logits."""
    ids, logits = generate(never_stopping, conversations, 6)
    for i, messages in enumerate(conversations):
        alone_ids, alone = generate(never_stopping, [messages], 6)
        assert ids[i] == alone_ids[0]
        torch.testing.assert_close(logits[i], alone[0], rtol=0, atol=1e-4)
    first = logits[:, 0]
    assert (first[1:] - first[0]).abs().amax() > 0.01, "every prompt gave the same logits: the test proves little"
    replies = never_stopping.chat_batch(conversations, max_new_tokens=6)
    assert all(r.finish_reason == "length" and r.completion_tokens == 6 for r in replies)


def test_every_generated_token_is_the_greedy_choice_of_a_full_forward(never_stopping, conversations):
    """generate() with a KV cache over embeddings must pick, at each step, the argmax of the logits that the
    model gives the whole sequence (prompt + answer so far) in one teacher-forced forward pass."""
    chat = never_stopping
    for messages in conversations[:3]:
        ids, pixels = chat.prepare(messages)
        new = generate(chat, [messages], 8)[0][0]
        with torch.no_grad():
            logits = chat.model(torch.tensor([ids + new]), pixels)[0][0]
        assert logits[len(ids) - 1:-1].argmax(-1).tolist() == new


def test_stream_pieces_join_to_the_chat_text(vision_chat, never_stopping, conversations):
    for messages in conversations[:3]:
        pieces = list(vision_chat.stream(messages, max_new_tokens=10))
        assert "".join(pieces) == vision_chat.chat(messages, max_new_tokens=10).text and pieces
    long = list(never_stopping.stream(conversations[2], max_new_tokens=10))
    assert "".join(long) == never_stopping.chat(conversations[2], max_new_tokens=10).text


def test_reply_fields(vision_chat, conversations):
    messages = conversations[0]
    ids, _ = vision_chat.prepare(messages)
    full = vision_chat.chat(messages, max_new_tokens=12)
    assert full.prompt_tokens == len(ids) and full.finish_reason == "stop"
    answer_ids = vision_chat.tokenizer(full.text, add_special_tokens=False)["input_ids"]
    assert full.completion_tokens == len(answer_ids) + 1  # the answer and its end of turn
    cut = vision_chat.chat(messages, max_new_tokens=1)
    assert (cut.finish_reason, cut.completion_tokens, cut.prompt_tokens) == ("length", 1, len(ids))
    assert cut.text == vision_chat.tokenizer.decode(answer_ids[:1]).strip()


def test_sampling_with_a_seed_is_reproducible(vision_chat, conversations):
    def sample(seed):
        torch.manual_seed(seed)
        return [vision_chat.chat(m, max_new_tokens=8, temperature=1.5, top_p=0.95).text for m in conversations[:3]]

    first = sample(0)
    assert sample(0) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "sampling gave the same answers for every seed"


# ---------------------------------------------------------------- images: every way of naming one

def test_data_url_path_and_file_url_give_the_same_pixels_and_answer(vision_chat, vlm_data):
    path = vlm_data / "images" / "heldout" / "000003.png"
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    refs = {"path": str(path), "file": path.as_uri(), "data": data_url, "relative": "images/heldout/000003.png"}
    prepared = {k: vision_chat.prepare(ask("What shape is the red object?", ref), image_root=str(vlm_data))
                for k, ref in refs.items()}
    for k, (ids, pixels) in prepared.items():
        assert ids == prepared["path"][0], k
        torch.testing.assert_close(pixels, prepared["path"][1], rtol=0, atol=0, msg=k)
    answers = {k: vision_chat.chat(ask("What shape is the red object?", ref), max_new_tokens=8,
                                   image_root=str(vlm_data)).text for k, ref in refs.items()}
    assert len(set(answers.values())) == 1, answers


# ---------------------------------------------------------------- errors, before any generation

@pytest.fixture
def no_generation(vision_chat, monkeypatch):
    def generate(*args, **kwargs):
        raise AssertionError("generation started on bad input")

    monkeypatch.setattr(vision_chat.model.lm, "generate", generate)
    return vision_chat


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels and that holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def bad_requests(tmp_path, vlm_data, max_prompt_tokens: int):
    png = str(vlm_data / "images" / "heldout" / "000000.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "bomb.png").write_bytes(bomb_png(60_000, 60_000))  # over PIL's own guard too
    (tmp_path / "big.png").write_bytes(bomb_png(8000, 7000))  # over max_pixels (50M), under PIL's guard (89M)
    return [
        ([], ChatFormatError, "messages must be a non-empty list"),
        ([{"role": "robot", "content": "hi"}], ChatFormatError, r"messages\[0\]: unknown role 'robot'"),
        ([{"role": "user", "content": 42}], ChatFormatError, "content must be a string or a list of parts"),
        ([{"role": "user", "content": [{"type": "audio"}]}], ChatFormatError, "unknown part type 'audio'"),
        ([*ask("What colour is the star?", png), {"role": "assistant", "content": "red"}], ChatFormatError,
         "the last message must be from the user, not assistant"),
        (ask("Compare them.", *[png] * 11), ChatFormatError, "11 images, over the limit of 10"),
        (ask("What is it?", str(tmp_path / "notes.png")), NotAnImage, "not an image"),
        (ask("What is it?", str(tmp_path / "missing.png")), FileNotFoundError, "no such file"),
        (ask("What is it?", str(tmp_path / "bomb.png")), ImageTooLarge, r"image too large \(Image size \(3600000000"),
        (ask("What is it?", str(tmp_path / "big.png")), ImageTooLarge, "8000x7000 = 56,000,000 pixels exceeds"),
        (ask("What is it?", "data:image/png;base64,!!!"), ValueError, "bad base64"),
        (ask("What is it?", "images/heldout/000000.png"), FileNotFoundError, "no such file"),  # relative to the cwd
        (ask("word " * max_prompt_tokens, png), PromptTooLong, f"over the limit of {max_prompt_tokens}"),
    ]


def test_bad_requests_fail_before_generation(no_generation, tmp_path, vlm_data):
    chat = no_generation
    assert chat.max_prompt_tokens == 256 - 64  # the run's --max_tokens, less the room kept for the answer
    for messages, error, match in bad_requests(tmp_path, vlm_data, chat.max_prompt_tokens):
        with pytest.raises(error, match=match):
            chat.chat(messages, max_new_tokens=4)
        with pytest.raises(error, match=match):
            chat.chat_batch([ask("What colour is the star?"), messages], max_new_tokens=4)
        with pytest.raises(error, match=match):
            next(chat.stream(messages, max_new_tokens=4))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
])
def test_bad_generation_settings_are_refused(no_generation, kwargs, match):
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match=match):
        no_generation.chat(messages, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match=match):
        next(no_generation.stream(messages, **{"max_new_tokens": 4, **kwargs}))
