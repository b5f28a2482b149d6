"""A stand-in for mm.vlm.inference.VisionChat, for testing the vision-chat entry points (HTTP API, demo) fast and
without a model: the same interface, the same checks on the request (messages checked by mm.decoders' rules, each
image read and opened with its pixel limit, a prompt-length limit) and the same exceptions, before any "generation".

It looks at the images it is given: the answer names the main colour of each image and repeats the question, one
word per token, so a test can tell what reached it. Streaming can be slowed (`delay` seconds per piece) or held
after `hold_after` pieces until `release()`, so a test sees partial text before the rest.

    install_fake_chat(monkeypatch)   # `from mm.vlm.inference import VisionChat` now gives a FakeVisionChat
"""
from __future__ import annotations

import base64
import io
import sys
import threading
import time
import types
from pathlib import Path
from typing import Iterator

import numpy as np

from mm.decoders import ChatFormatError, _message
from mm.media import open_image, read_ref, short_ref
from mm.vlm.inference import ChatReply, PromptTooLong  # the real ones: the stand-in raises and returns them

HOLD_GUARD_S = 120  # a hang guard for a held generation, not a speed limit
IMAGE_TOKENS = 16  # prompt tokens an image counts for
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "white": (245, 245, 245), "black": (10, 10, 10)}
TRAIN_HINT = "Train one with: python recipes/vlm/train.py"


def colour_name(image) -> str:
    """The name in COLOURS nearest to the image's mean colour."""
    mean = np.asarray(image.resize((8, 8)), dtype=np.float64).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOURS[n], mean)))


def png_data_url(colour=(220, 30, 30), size: int = 16) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class FakeVisionChat:
    """VisionChat's interface with no model: "I see a red image. You asked: what colour is it?" """

    def __init__(self, max_images: int = 2, max_prompt_tokens: int = 120, max_pixels: int = 1_000_000,
                 name: str = "fake-vlm", delay: float = 0.0, hold_after: int | None = None,
                 stream_returns_reply: bool = True):
        self.max_images, self.max_prompt_tokens, self.max_pixels = max_images, max_prompt_tokens, max_pixels
        self.name = name
        self.delay, self.hold_after, self.stream_returns_reply = delay, hold_after, stream_returns_reply
        self.calls: list[dict] = []  # each generation's arguments and prompt, for the tests to read
        self.active = self.most_active = 0  # generations running at once (now / at most)
        self.pieces_made = 0  # text pieces generated, over all calls
        self.started = threading.Event()  # set when a generation begins
        self._gate = threading.Event()
        self._count = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu") -> "FakeVisionChat":
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no trained vision-chat model here. {TRAIN_HINT}")
        return cls(name=Path(path).name)

    def hold(self, after: int) -> None:
        """Hold the next generations after `after` pieces, until release()."""
        self._gate.clear()
        self.hold_after = after

    def release(self) -> None:
        """Let a generation held at hold_after pieces go on."""
        self._gate.set()

    # ---------------------------------------------------------------- the checks, as the real one's

    def prepare(self, messages) -> tuple[int, list[str], str]:
        """(prompt tokens, the images' colours, the last user text); the real one's errors for bad input."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages must be a non-empty list")
        urls: list[str] = []
        canonical = [_message(m, f"messages[{i}]", urls, sft=True) for i, m in enumerate(messages)]
        if canonical[-1]["role"] != "user":
            raise ChatFormatError(f"the last message must be from the user, not {canonical[-1]['role']}")
        if len(urls) > self.max_images:
            raise ChatFormatError(f"{len(urls)} images, over the limit of {self.max_images}")
        colours = [colour_name(open_image(read_ref(url, None, 5_000_000), self.max_pixels,
                                          name=f"image {i} ({short_ref(url)})")) for i, url in enumerate(urls)]
        words = sum(len(p["text"].split()) for m in canonical for p in m["content"] if p["type"] == "text")
        tokens = words + 4 * len(canonical) + IMAGE_TOKENS * len(urls)
        if tokens > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is {tokens} tokens, over the limit of {self.max_prompt_tokens}")
        question = " ".join(p["text"] for p in canonical[-1]["content"] if p["type"] == "text")
        return tokens, colours, question

    def answer_words(self, colours: list[str], question: str) -> list[str]:
        seen = " and ".join(f"a {c} image" for c in colours) or "no image"
        return f"I see {seen}. You asked: {question}".split()

    # ---------------------------------------------------------------- generation

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0) -> ChatReply:
        return self.chat_batch([messages], max_new_tokens, temperature, top_p)[0]

    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float = 1.0) -> list[ChatReply]:
        prepared = [self.prepare(m) for m in conversations]  # every conversation checked before any answer
        replies = []
        for tokens, colours, question in prepared:
            pieces = list(self._generate(tokens, colours, question, max_new_tokens, temperature, top_p, "chat"))
            finish = "length" if len(pieces) < len(self.answer_words(colours, question)) else "stop"
            replies.append(ChatReply("".join(pieces).strip(), tokens, len(pieces), finish))
        return replies

    def stream(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0) -> Iterator[str]:
        """Text pieces (" word"); the checks run at the first next(), as in a generator function. Returns (as
        StopIteration.value) the ChatReply, unless built with stream_returns_reply=False."""
        tokens, colours, question = self.prepare(messages)
        n = 0
        for piece in self._generate(tokens, colours, question, max_new_tokens, temperature, top_p, "stream"):
            n += 1
            yield piece.lstrip() if n == 1 else piece
        full = len(self.answer_words(colours, question))
        if self.stream_returns_reply:
            return ChatReply("", tokens, n, "length" if n < full else "stop")

    def _generate(self, tokens, colours, question, max_new_tokens, temperature, top_p, kind) -> Iterator[str]:
        self.calls.append({"kind": kind, "prompt_tokens": tokens, "colours": colours, "question": question,
                           "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p})
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.started.set()
        try:
            for i, word in enumerate(self.answer_words(colours, question)[:max_new_tokens]):
                if i == self.hold_after and not self._gate.wait(HOLD_GUARD_S):
                    raise RuntimeError(f"held {HOLD_GUARD_S} s: the test never called release()")
                time.sleep(self.delay)
                self.pieces_made += 1
                yield " " + word
        finally:
            with self._count:
                self.active -= 1


def install_fake_chat(monkeypatch, **kwargs) -> list:
    """Make `from mm.vlm.inference import VisionChat, PromptTooLong` give the fakes for this test;
    from_checkpoint builds a FakeVisionChat with `kwargs`. Returns the list that collects the chats made."""
    made = []

    class Installed(FakeVisionChat):
        @classmethod
        def from_checkpoint(cls, path, device="cpu"):
            fake = FakeVisionChat.from_checkpoint.__func__(cls, path, device)
            fake.__init__(**{"name": Path(path).name, **kwargs})
            made.append(fake)
            return fake

    module = types.ModuleType("mm.vlm.inference")
    module.VisionChat, module.PromptTooLong, module.ChatReply = Installed, PromptTooLong, ChatReply
    monkeypatch.setitem(sys.modules, "mm.vlm.inference", module)
    return made
