"""Gradio vision Q&A playground: upload an image, ask about it, follow up; answers stream in as they are generated.

    python demos/vlm_app.py                           # the model recipes/vlm/train.py wrote to runs/vlm
    python demos/vlm_app.py --model runs/vlm_smollm2 --port 7861
    python demos/vlm_app.py --host 0.0.0.0 --max-file-size 5mb

Serves on http://127.0.0.1:7860 (only this machine) unless --host says otherwise. With no model at runs/vlm it
still starts, and says how to train one. One answer is generated at a time; up to 16 more requests wait their
turn, later ones are turned away. An upload is refused over --max-file-size (by gradio, before it is stored) and
over the model's pixel limit (from the image's header, before it is decoded). The chat is an API endpoint too:

    Client(url).submit({"text": "What colour is the star?", "files": [handle_file("scene.png")]}, 0.0, 64,
                       api_name="/chat")    # yields the answer as it grows
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing

# A local demo has no business phoning home: no usage analytics, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from mm.cli import add_serve_arguments, file_size  # noqa: E402

DEFAULT_MODEL = "runs/vlm"
TRAIN_HINT = ("Train one with `python recipes/vlm/train.py` (it builds its synthetic scenes first; minutes on a CPU) "
              "and restart this demo, or start it with `--model PATH`: a run folder or its export.")
UPLOAD_NAME = "the uploaded image"  # how messages call an upload: never the server's temp path
QUEUE_SIZE = 16  # requests waiting for the model; more are turned away
MAX_TOKENS = 512  # the max-token slider's top
CACHE_MAX_AGE_S = 3600  # gradio's copies of uploads are deleted after an hour


# ---------------------------------------------------------------- model

def load_chat(model: str, device: str | None):
    """VisionChat.from_checkpoint(model), or None when nothing is at that path (the no-model page)."""
    if not Path(model).exists():
        return None
    from mm.vlm.inference import VisionChat  # torch and the model code, only once there is a model to load

    device = device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    return VisionChat.from_checkpoint(model, device=device)


def no_model_message(model: str) -> str:
    return f"No vision-chat model at `{model}`. {TRAIN_HINT}"


# ---------------------------------------------------------------- the conversation, as OpenAI messages

def file_path(item) -> str | None:
    """The local path in one of gradio's file forms: {"path"}, {"type": "file", "file": {"path"}}, FileData, str."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        inner = item.get("file") if item.get("type") == "file" else item
        return file_path(inner) if inner is not item else item.get("path")
    return getattr(item, "path", None)


def content_parts(content) -> list[dict]:
    """A chat history entry's content (a string, a file, or a list of them) as OpenAI content parts."""
    items = content if isinstance(content, (list, tuple)) else [content]
    parts = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "text":
            item = item.get("text", "")
        if isinstance(item, str):
            if item.strip():
                parts.append({"type": "text", "text": item})
        elif file_path(item):
            parts.append({"type": "image_url", "image_url": {"url": str(file_path(item))}})
    return parts


def to_messages(history: list, message: dict) -> list[dict]:
    """gradio's history (role/content dicts) and the new multimodal message ({"text", "files"}) as OpenAI messages,
    images as local paths: consecutive entries of one role become one message, so the image a user sent with their
    first question stays in that turn."""
    turns = [(entry.get("role"), content_parts(entry.get("content"))) for entry in history if isinstance(entry, dict)]
    files = [{"path": file_path(f)} for f in message.get("files") or []]
    turns.append(("user", content_parts([*files, message.get("text") or ""])))
    messages: list[dict] = []
    for role, parts in turns:
        if role not in ("user", "assistant") or not parts:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += parts
        else:
            messages.append({"role": role, "content": list(parts)})
    for m in messages:  # assistant turns as plain text: the form every chat template takes
        if m["role"] == "assistant":
            m["content"] = "".join(p["text"] for p in m["content"] if p["type"] == "text")
    return messages


def image_paths(messages: list[dict]) -> list[str]:
    return [p["image_url"]["url"] for m in messages if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]


def without_paths(text: str, paths: list[str]) -> str:
    """`text` with the server's upload paths replaced by UPLOAD_NAME (they are gradio's temp files)."""
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, UPLOAD_NAME)
    return re.sub(r"(/[\w.-]+)+/gradio/\S+", UPLOAD_NAME, text)  # any other cache path


# ---------------------------------------------------------------- one turn

def check_settings(temperature, max_tokens) -> tuple[float, int]:
    """The sliders' values, checked: the API can send anything."""
    import gradio as gr

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise gr.Error(f"temperature: a number from 0 to 2, not {str(temperature)[:40]!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, float)) or not 1 <= max_tokens <= MAX_TOKENS \
            or int(max_tokens) != max_tokens:
        raise gr.Error(f"max tokens: a whole number from 1 to {MAX_TOKENS}, not {str(max_tokens)[:40]!r}")
    return float(temperature), int(max_tokens)


def check_uploads(chat, message: dict, messages: list[dict]) -> None:
    """gr.Error, naming no server path, for a new upload that is not an image or is too large, and for more
    images in the conversation than the model takes."""
    import gradio as gr

    from mm.media import open_image

    for f in message.get("files") or []:
        try:
            open_image(file_path(f), chat.max_pixels, name=UPLOAD_NAME)  # the header first: a bomb costs nothing
        except (ValueError, FileNotFoundError) as e:  # NotAnImage, ImageTooLarge, gone
            raise gr.Error(str(e)) from None
    if len(image_paths(messages)) > chat.max_images:
        raise gr.Error(f"This model takes at most {chat.max_images} image(s) per conversation. Clear the chat "
                       "(the bin above it) to ask about another image.")


def make_respond(chat, model: str):
    """respond(message, history, temperature, max_tokens) -> the answer so far, again and again as it grows;
    gr.Error, which the page shows and the app outlives, for anything it cannot do."""
    import gradio as gr

    def respond(message: dict, history: list, temperature: float, max_tokens: int):
        if chat is None:
            raise gr.Error(no_model_message(model), duration=None)
        if not isinstance(message, dict) or not ((message.get("text") or "").strip() or message.get("files")):
            raise gr.Error("Type a question, or upload an image with one.")
        temperature, max_tokens = check_settings(temperature, max_tokens)
        messages = to_messages(history or [], message)
        check_uploads(chat, message, messages)
        text = ""
        try:  # the chat checks everything at its first step, before generating
            for piece in chat.stream(messages, max_new_tokens=max_tokens, temperature=temperature):
                text += piece
                yield text
        except (ValueError, FileNotFoundError) as e:  # ChatFormatError, PromptTooLong, an image gone from the cache
            message = without_paths(str(e), image_paths(messages))
            from mm.vlm.server import is_prompt_too_long
            if is_prompt_too_long(e):
                message = message.rstrip(".") + ". Clear the chat (the bin above it) to start a new one."
            raise gr.Error(message) from None
        if not text.strip():
            gr.Warning("The model gave an empty answer.")
            yield "…"

    return respond


# ---------------------------------------------------------------- the page

def build_app(chat, model: str = DEFAULT_MODEL):
    """The Blocks app: a multimodal chat (an image and a question in; the answer streamed out), temperature and
    max-token controls, the chatbot's own clear button; API name "chat". chat None: a page saying how to train."""
    import gradio as gr

    limits = ("" if chat is None else
              f"Model: `{chat.name}`. Up to {chat.max_images} image(s) per conversation, "
              f"{chat.max_pixels:,} pixels each.")
    with gr.Blocks(title="mm vision chat", analytics_enabled=False,
                   delete_cache=(CACHE_MAX_AGE_S, CACHE_MAX_AGE_S)) as demo:
        gr.Markdown("## Vision chat\nUpload an image, ask a question about it, then follow up. " + limits)
        if chat is None:
            gr.Markdown(f"### No model yet\n{no_model_message(model)}", elem_id="no-model")
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="Temperature", elem_id="temperature",
                                info="0: the most likely answer, the same each time")
        max_tokens = gr.Slider(1, MAX_TOKENS, value=128, step=1, label="Max tokens", elem_id="max-tokens",
                               info="the longest answer, in tokens")
        gr.ChatInterface(
            make_respond(chat, model), multimodal=True, api_name="chat", additional_inputs=[temperature, max_tokens],
            chatbot=gr.Chatbot(label="Conversation", elem_id="chatbot", height=420),
            textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single", sources=["upload"],
                                         placeholder="Ask about the image…", elem_id="question"),
            fill_height=False)
    return demo


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"a run folder of recipes/vlm/train.py or its export (default: {DEFAULT_MODEL}, "
                                   "or a page saying how to make it)")
    add_serve_arguments(p, port=7860)
    p.add_argument("--max-file-size", type=file_size, default="10mb",
                   help="largest upload accepted: 10mb, 800kb, ... (default: %(default)s)")
    args = p.parse_args(argv)
    if args.model is not None and not Path(args.model).exists():
        p.error(f"--model {args.model}: no such file or folder")
    model = args.model or DEFAULT_MODEL
    try:
        chat = load_chat(model, args.device)
    except (ValueError, OSError) as e:  # there, but unusable (no export yet, say): refuse to start
        sys.exit(f"error: {e}")
    if chat is None:
        print(f"warning: {no_model_message(model)}", file=sys.stderr)
    demo = build_app(chat, model)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
