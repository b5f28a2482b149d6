"""Decoders: a raw sample (a WebDataset tar sample, or a JSONL manifest line) -> what a recipe trains on.

Each `*_decoder(...)` returns a module-level function bound with functools.partial, so DataLoader
workers can pickle it under any start method. A decoder raises (any exception, its message naming the
sample) on a bad sample; the loader counts it under `bad_samples` and goes on. Image decoding goes
through `mm.media.open_image`, so a decompression bomb inside a shard is refused from its header like
an uploaded one; audio through `mm.media.load_audio`, so an over-long clip is refused from its header.

Raw samples, as the loader hands them over:
- a tar sample: {"__key__": "000123", "__url__": shard, <field>: bytes}, fields named by the file name
  after the first dot ("000123.img0.jpg" -> "img0.jpg");
- a JSONL manifest line: {"__key__": "<manifest stem>:<line>", "__url__": manifest, "__root__": the
  manifest's folder, "json": the line's bytes}; paths inside are relative to __root__ unless absolute.
"""
from __future__ import annotations

import functools
import json

import torch

from mm.media import (AUDIO_KEYS, DEFAULT_MAX_PIXELS, IMAGE_KEYS, SAMPLE_RATE, AudioTooLong, RefTooLarge,
                      UnreadableRef, load_audio, open_image, read_ref, short_ref)

TEXT_KEYS = ("txt", "caption", "text")


def first_key(sample: dict, keys: tuple[str, ...], what: str) -> bytes:
    """The value of the first of `keys` present in `sample`; a clear error naming the sample if none is."""
    for k in keys:
        if k in sample:
            return sample[k]
    raise KeyError(f"no {what} ({'/'.join(keys)}) in sample {sample.get('__key__')}; "
                   f"has {sorted(k for k in sample if not k.startswith('__'))}")


# ---------------------------------------------------------------- images (CLIP)

def decode_image(sample: dict, preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The sample's image (any of IMAGE_KEYS), RGB, through `preprocess` -> [3, H, W]."""
    return preprocess(open_image(first_key(sample, IMAGE_KEYS, "image"), max_pixels, name=f"sample {sample.get('__key__')}"))


def _decode_pair(sample: dict, preprocess) -> tuple[torch.Tensor, str]:
    caption = first_key(sample, TEXT_KEYS, "caption").decode("utf-8").strip()
    if not caption:
        raise ValueError("empty caption")
    return decode_image(sample, preprocess), caption


def _decode_labelled(sample: dict, preprocess) -> tuple[torch.Tensor, int]:
    return decode_image(sample, preprocess), json.loads(sample["json"])["label_index"]


def pair_decoder(preprocess):
    """decode(sample) -> (image [3, H, W], caption); an empty caption is a bad sample."""
    return functools.partial(_decode_pair, preprocess=preprocess)


def labelled_decoder(preprocess):
    """decode(sample) -> (image [3, H, W], label index from the sample's json)."""
    return functools.partial(_decode_labelled, preprocess=preprocess)


# ---------------------------------------------------------------- shared: a sample's JSON, and what it points at

def sample_name(sample: dict) -> str:
    """How messages call a sample: "sample 000123", or "sample train:17" for a manifest line."""
    return f"sample {sample.get('__key__')}"


def parse_json(sample: dict, what: str = "json"):
    """The sample's `json` field, parsed; an error naming the sample if it is missing or not JSON."""
    raw = first_key(sample, ("json",), what)
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{sample_name(sample)}: {what} is not valid JSON ({e})") from None


def fetch_ref(sample: dict, ref: str, max_bytes: int) -> bytes:
    """The bytes `ref` points at, seen from `sample`: another field of a tar sample ("img0.jpg"), or
    whatever read_ref reads (a path relative to a manifest's folder, file:, data:, http(s) URL).

    Errors keep their type (FileNotFoundError, UnreadableRef, RefTooLarge) and gain the sample's name.
    """
    name = sample_name(sample)
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{name}: a reference must be a non-empty string, got {ref!r}")
    from_tar = "__root__" not in sample
    if from_tar and ref in sample and not ref.startswith("__"):
        if len(sample[ref]) > max_bytes:
            raise RefTooLarge(f"{name}: field '{ref}' has {len(sample[ref]):,} bytes, over the limit of {max_bytes:,}")
        return sample[ref]
    try:
        return read_ref(ref, sample.get("__root__"), max_bytes)
    except (FileNotFoundError, UnreadableRef) as e:
        fields = sorted(k for k in sample if not k.startswith("__"))
        hint = f" (nor a field of the sample, which has {fields})" if from_tar else ""
        raise type(e)(f"{name}: {e}{hint}") from None


def _metadata(sample: dict) -> dict:
    """The sample's `json` field as a dict, or {} when it has none."""
    if "json" not in sample:
        return {}
    meta = parse_json(sample)
    if not isinstance(meta, dict):
        raise ValueError(f"{sample_name(sample)}: json is a {type(meta).__name__}, not an object")
    return meta


def _field_text(sample: dict, key: str) -> str:
    try:
        return sample[key].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{sample_name(sample)}: field '{key}' is not UTF-8 text") from None


# ---------------------------------------------------------------- audio (ASR)

AUDIO_REF_KEYS = ("audio", "audio_filepath")  # in a manifest line: ours, and NeMo's
LANGUAGE_KEYS = ("language", "lang")
# What one audio reference may weigh: 10 minutes of 48 kHz stereo 16-bit WAV is 115 MB.
DEFAULT_MAX_AUDIO_BYTES = 128 * 2**20


def audio_decoder(sample_rate: int = SAMPLE_RATE, max_seconds: float | None = 30.0, min_seconds: float = 0.0,
                  max_bytes: int = DEFAULT_MAX_AUDIO_BYTES):
    """decode(sample) -> {"audio": float32 [T] mono at sample_rate Hz, "duration": T / sample_rate seconds,
    "text": transcript (stripped, never empty), "language": str or None, ["segments"]}.
    "segments" comes from the json when it has them: [{"start", "end" (seconds), "text"}], checked to be
    ordered and inside the audio.

    A tar sample carries the audio as a field (any of AUDIO_KEYS), the transcript as a field (TEXT_KEYS)
    or as "text" in its json, the language as "language"/"lang" in its json or as a field. A manifest
    line is {"audio" (or NeMo's "audio_filepath"): ref, "text": ..., "language": ..., "duration": s};
    the ref goes through fetch_ref. A given duration over max_seconds (or under min_seconds) refuses
    the sample before the audio is opened. Bad samples raise (AudioTooLong, NotAudio, ValueError, ...).
    """
    return functools.partial(_decode_audio, sample_rate=sample_rate, max_seconds=max_seconds,
                             min_seconds=min_seconds, max_bytes=max_bytes)


def audio_length(decoded: dict) -> float:
    """A decoded ASR sample's length in seconds: what a duration-bucketed batcher sorts by."""
    return float(decoded["duration"])


def _decode_audio(sample: dict, sample_rate: int, max_seconds: float | None, min_seconds: float,
                  max_bytes: int) -> dict:
    name = sample_name(sample)
    meta = _metadata(sample)
    text, language = _transcript(sample, meta), _language(sample, meta)  # cheap checks before decoding
    _check_declared_duration(meta, max_seconds, min_seconds, name)
    data, source = _audio_bytes(sample, meta, max_bytes)
    audio = load_audio(data, sample_rate, max_seconds, name=f"{name} ({source})")
    duration = len(audio) / sample_rate
    if duration < min_seconds:
        raise ValueError(f"{name}: {duration:.2f} s is shorter than the minimum of {min_seconds:g} s")
    out = {"audio": torch.from_numpy(audio), "duration": duration, "text": text, "language": language}
    if meta.get("segments") is not None:
        out["segments"] = _segments(meta["segments"], duration, name)
    return out


def _segments(segments, duration: float, name: str) -> list[dict]:
    """Timed phrases from the json: [{"start", "end" (seconds), "text"}], ordered, inside the audio."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"{name}: \"segments\" must be a non-empty list of {{start, end, text}}")
    out, last_end = [], 0.0
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or not {"start", "end", "text"} <= seg.keys():
            raise ValueError(f"{name}: segment {i} needs start, end and text, got {seg!r}")
        start, end, text = seg["start"], seg["end"], seg["text"]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (start, end)) \
                or not isinstance(text, str):
            raise ValueError(f"{name}: segment {i} has non-numeric times or non-string text: {seg!r}")
        # 20 ms of slack: times are rounded to Whisper's 0.02 s timestamp steps
        if not last_end - 0.02 <= start < end <= duration + 0.02:
            raise ValueError(f"{name}: segment {i} ({start}-{end} s) is out of order or outside the "
                             f"{duration:.2f} s of audio")
        out.append({"start": float(start), "end": float(min(end, duration)), "text": text.strip()})
        last_end = end
    return out


def _transcript(sample: dict, meta: dict) -> str:
    """From a text field (txt/caption/text) if the sample has one, else the json's "text"."""
    name = sample_name(sample)
    if any(k in sample for k in TEXT_KEYS):
        text = _field_text(sample, next(k for k in TEXT_KEYS if k in sample))
    elif "text" in meta:
        text = meta["text"]
        if not isinstance(text, str):
            raise ValueError(f"{name}: \"text\" is a {type(text).__name__}, not a string")
    else:
        raise KeyError(f"no transcript ({'/'.join(TEXT_KEYS)} field, or \"text\" in json) in {name}")
    if not text.strip():
        raise ValueError(f"{name}: empty transcript")
    return text.strip()


def _language(sample: dict, meta: dict) -> str | None:
    """From the json's "language"/"lang", else a field of that name; None when absent or blank."""
    for key in LANGUAGE_KEYS:
        if key in meta:
            if meta[key] is None:
                return None
            if not isinstance(meta[key], str):
                raise ValueError(f"{sample_name(sample)}: \"{key}\" is a {type(meta[key]).__name__}, not a string")
            return meta[key].strip() or None
    for key in LANGUAGE_KEYS:
        if key in sample:
            return _field_text(sample, key).strip() or None
    return None


def _check_declared_duration(meta: dict, max_seconds: float | None, min_seconds: float, name: str) -> None:
    """Refuse from a manifest's "duration" (seconds), so an over-long clip is never fetched nor opened."""
    if "duration" not in meta:
        return
    seconds = meta["duration"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"{name}: \"duration\" must be a number of seconds, got {seconds!r}")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLong(f"{name}: declared duration {seconds:g} s exceeds the limit of {max_seconds:g} s")
    if seconds < min_seconds:
        raise ValueError(f"{name}: declared duration {seconds:g} s is shorter than the minimum of {min_seconds:g} s")


def _audio_bytes(sample: dict, meta: dict, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, where from): a field (any of AUDIO_KEYS) of a tar sample, else what the json's
    "audio"/"audio_filepath" points at."""
    for key in AUDIO_KEYS:
        if key in sample:
            return sample[key], f"field {key}"
    for key in AUDIO_REF_KEYS:
        if key in meta:
            return fetch_ref(sample, meta[key], max_bytes), short_ref(str(meta[key]))
    raise KeyError(f"no audio ({'/'.join(AUDIO_KEYS)} field, or {'/'.join(AUDIO_REF_KEYS)} in json) in "
                   f"{sample_name(sample)}; has {sorted(k for k in sample if not k.startswith('__'))}")


# ---------------------------------------------------------------- chat (vision SFT and DPO)
# OpenAI's fine-tuning formats, one JSON object per line:
#   SFT:        {"messages": [{"role", "content": str | [part], "weight"?: 0|1 (assistant only)}, ...]}
#   preference: {"input": {"messages": [...]},
#                "preferred_output": [assistant msg], "non_preferred_output": [assistant msg]}
#   parts:      {"type": "text", "text"} | {"type": "image_url", "image_url": {"url", "detail"?}} (user messages only)
# As OpenAI checks: known roles and keys, non-empty content, at least one assistant message (we also
# need one with weight 1), weight 0 or 1. Not required: that the conversation ends with the assistant.
# Not supported (refused, never dropped silently): tool calls and tool definitions, audio/file/refusal parts.

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
IMAGE_DETAILS = ("auto", "low", "high")  # validated, then left to image_transform: we decode full size
DEFAULT_MAX_IMAGES = 10  # per example, OpenAI's limit for vision fine-tuning
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20  # per image file; OpenAI's limit is 10 MB, a lossless photo may weigh more


class ChatFormatError(ValueError):
    """A chat line that breaks the fine-tuning format (or asks for what we do not support)."""


def chat_decoder(image_transform=None, max_pixels: int = DEFAULT_MAX_PIXELS, max_images: int = DEFAULT_MAX_IMAGES,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
    """decode(sample) -> a chat line checked and normalised, its images decoded.

    SFT -> {"messages": [msg], "images": [img]}; preference -> {"prompt": [msg], "chosen": [msg],
    "rejected": [msg], "images": [img]}, chosen and rejected one assistant message each.
    msg = {"role", "content": [{"type": "text", "text"} | {"type": "image", "index": i}], "weight": 0|1}
    (+ "name" when given); weight 1 = in the loss: SFT assistant messages unless weighted 0, the
    chosen and rejected answers; never system, user or prompt messages. images[i] = image_transform
    (PIL RGB) (e.g. [3, H, W]), or the PIL RGB image itself without a transform.
    The chat comes from the `json` field; image urls are a path (relative to a manifest's folder),
    file:, data:, http(s) URL, or in a tar sample another field of it ("img0.jpg"). The whole line
    is checked before any image is fetched; an image over max_pixels is refused from its header.
    """
    return functools.partial(_decode_chat, image_transform=image_transform, max_pixels=max_pixels,
                             max_images=max_images, max_image_bytes=max_image_bytes)


def _decode_chat(sample: dict, image_transform, max_pixels: int, max_images: int, max_image_bytes: int) -> dict:
    name = sample_name(sample)
    record = parse_json(sample, "chat json")
    urls = []  # image urls in order of appearance: {"type": "image", "index": i} points at urls[i]
    try:
        if not isinstance(record, dict):
            raise ChatFormatError(f"the line is a JSON {type(record).__name__}, not an object")
        if "messages" in record:
            chat = {"messages": _sft_messages(record, urls)}
        elif "input" in record:
            chat = _preference(record, urls)
        else:
            raise ChatFormatError("neither \"messages\" (supervised) nor \"input\" (preference) in the line")
        if len(urls) > max_images:
            raise ChatFormatError(f"{len(urls)} images, over the limit of {max_images}")
    except ChatFormatError as e:
        raise ChatFormatError(f"{name}: {e}") from None
    chat["images"] = [_load_chat_image(sample, url, i, image_transform, max_pixels, max_image_bytes)
                      for i, url in enumerate(urls)]
    return chat


def _sft_messages(record: dict, urls: list[str]) -> list[dict]:
    _refuse_tools(record, "")
    messages = [_message(m, f"messages[{i}]", urls, sft=True) for i, m in enumerate(_message_list(record, "messages"))]
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ChatFormatError("no assistant message: nothing to learn")
    if not any(m["weight"] for m in answers):
        raise ChatFormatError("every assistant message has weight 0: nothing to learn")
    return messages


def _preference(record: dict, urls: list[str]) -> dict:
    source = record["input"]
    if not isinstance(source, dict):
        raise ChatFormatError("\"input\" must be an object holding \"messages\"")
    _refuse_tools(source, "input.")
    prompt = [_message(m, f"input.messages[{i}]", urls, sft=False)
              for i, m in enumerate(_message_list(source, "messages", "input."))]
    if prompt[-1]["role"] != "user":
        raise ChatFormatError("the last input message must be a user message: "
                              "the preferred and non-preferred outputs answer it")
    for m in prompt:
        m["weight"] = 0  # DPO scores the two answers only
    return {"prompt": prompt, "chosen": _preference_output(record, "preferred_output", urls),
            "rejected": _preference_output(record, "non_preferred_output", urls)}


def _preference_output(record: dict, key: str, urls: list[str]) -> list[dict]:
    """record[key] as [one assistant message, weight 1]: OpenAI trains on one answer per side."""
    value = record.get(key)
    one = isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
    if not (one and value[0].get("role") == "assistant"):
        raise ChatFormatError(f"\"{key}\" must be a list of exactly one assistant message")
    message = _message(value[0], f"{key}[0]", urls, sft=False)
    message["weight"] = 1
    return [message]


def _refuse_tools(obj: dict, where: str) -> None:
    """Tool definitions change what the model is conditioned on: refuse them rather than drop them."""
    for key in ("tools", "functions"):
        if obj.get(key):
            raise ChatFormatError(f"{where}{key}: tool definitions are not supported")


def _message_list(obj: dict, key: str, where: str = "") -> list:
    messages = obj.get(key)
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}{key} must be a non-empty list of messages, got {messages!r:.60}")
    return messages


def _message(message, where: str, urls: list[str], sft: bool) -> dict:
    """One message, checked: {"role", "content": [parts], "weight"} (+ "name")."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"{where}: a message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{where}: unknown role {role!r} (accepted: {', '.join(ROLES)})")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise ChatFormatError(f"{where}: unsupported key(s) {', '.join(unknown)} (accepted: {', '.join(MESSAGE_KEYS)})")
    out = {"role": role, "content": _content(message.get("content"), role, where, urls),
           "weight": _weight(message, role, where, sft)}
    if "name" in message:
        if not isinstance(message["name"], str) or not message["name"]:
            raise ChatFormatError(f"{where}: name must be a non-empty string")
        out["name"] = message["name"]
    return out


def _weight(message: dict, role: str, where: str, sft: bool) -> int:
    """1 if the message is in the loss. "weight" is OpenAI's, on SFT assistant messages only: 0 or 1."""
    if "weight" not in message:
        return int(role == "assistant")
    if not sft:
        raise ChatFormatError(f"{where}: weight belongs to supervised data; a preference line trains on its outputs")
    if role != "assistant":
        raise ChatFormatError(f"{where}: weight is only for assistant messages, not {role}")
    weight = message["weight"]
    if type(weight) is not int or weight not in (0, 1):  # type(): True is an int, but not a documented weight
        raise ChatFormatError(f"{where}: weight must be 0 or 1, got {weight!r}")
    return weight


def _content(content, role: str, where: str, urls: list[str]) -> list[dict]:
    if content is None:
        raise ChatFormatError(f"{where}: no content")
    if isinstance(content, str):
        if not content.strip():
            raise ChatFormatError(f"{where}: empty content")
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ChatFormatError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    if not content:
        raise ChatFormatError(f"{where}: empty content")
    return [_part(part, role, f"{where}.content[{j}]", urls) for j, part in enumerate(content)]


def _part(part, role: str, where: str, urls: list[str]) -> dict:
    """{"type": "text", "text"} as it is; {"type": "image_url", ...} -> {"type": "image", "index"}."""
    if not isinstance(part, dict):
        raise ChatFormatError(f"{where}: a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str) or not part["text"].strip():
            raise ChatFormatError(f"{where}: a text part needs a non-empty \"text\" string")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        if role != "user":
            raise ChatFormatError(f"{where}: images are accepted in user messages only, not in {role} messages")
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url:
            raise ChatFormatError(f"{where}: an image_url part needs {{\"image_url\": {{\"url\": \"...\"}}}}")
        if image.get("detail", "auto") not in IMAGE_DETAILS:
            raise ChatFormatError(f"{where}: detail must be one of {', '.join(IMAGE_DETAILS)}, got {image['detail']!r}")
        urls.append(url)
        return {"type": "image", "index": len(urls) - 1}
    raise ChatFormatError(f"{where}: unknown part type {kind!r} (accepted: text, image_url)")


def _load_chat_image(sample: dict, url: str, index: int, image_transform, max_pixels: int, max_bytes: int):
    """One image url of a chat -> image_transform(PIL RGB), or the PIL RGB image."""
    image = open_image(fetch_ref(sample, url, max_bytes), max_pixels,
                       name=f"{sample_name(sample)}: image {index} ({short_ref(url)})")
    return image_transform(image) if image_transform is not None else image
