"""An OpenAI-compatible chat API for a vision-chat model.

    python -m mm.vlm.server --model runs/vlm                 # http://127.0.0.1:8000/docs
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What colour is the star?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(model="mm", messages=...)

Endpoints:
    POST /v1/chat/completions   OpenAI's body: messages (system/user/assistant; content a string or text and
                                image_url parts), max_completion_tokens or max_tokens, temperature (default 0:
                                greedy, not OpenAI's 1, so that answers repeat), top_p, n (1 only), stream,
                                stream_options; "model" is accepted and ignored. The answer is a chat.completion,
                                or with "stream": true Server-Sent Events of chat.completion.chunk objects ending
                                with "data: [DONE]", as the OpenAI clients read them.
    GET  /v1/models             the one model served
    GET  /health                what this server runs and accepts, and how busy it is
Image urls: data: URLs; local paths and file:// URLs on this machine (not when serving other machines, unless
--allow-local-images); http(s) URLs are refused (the server would fetch whatever a client names: SSRF).
Binds to 127.0.0.1 unless --host says otherwise. --max-concurrency generations run at once, each in a worker
thread so the event loop stays free; up to --max-waiting more wait their turn, later ones get a 429.

Bad input gets a 4xx in OpenAI's error shape, {"error": {"message", "type": "invalid_request_error", "param",
"code"}}, with the message also as "detail", before any generation:
    400 the body is not a JSON object; messages missing, empty or malformed (unknown role or key, no content, an
        image in a non-user message, the last message not the user's, too many images); an image that is not an
        image, too large in bytes or pixels (a decompression bomb; code image_too_large), or cannot be read (code
        invalid_image_url); a prompt over the model's limit (code context_length_exceeded); temperature outside
        [0, 2], top_p outside (0, 1], max tokens < 1 or over the cap, n other than 1; a feature this server does
        not offer (tools, stop, logprobs, a JSON response_format, ...)
    413 a request body over --max-body-bytes (checked before it is read)
    429 every generation slot busy and --max-waiting requests already waiting
Anything unexpected is a JSON 500 without a trace (the trace goes to the server log).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mm.cli import add_serve_arguments
from mm.decoders import ChatFormatError
from mm.http import LimitRequestBody, internal_error_handler
from mm.media import ImageTooLarge, NotAnImage, RefTooLarge, UnreadableRef

log = logging.getLogger("mm.vlm.server")
DEFAULT_MAX_BODY_BYTES = 50 * 2**20  # OpenAI's limit on the images of one request
DEFAULT_MAX_TOKENS = 256  # when the request names none
MAX_TOKENS_CAP = 2048  # the most a request may ask for
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Fields whose non-default values change what OpenAI would answer, which we cannot do: refused, not ignored.
# name -> (is the value harmless, what the field asks for)
UNSUPPORTED = {
    "tools": (lambda v: not v, "tool calls"), "functions": (lambda v: not v, "function calls"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calls"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calls"),
    "stop": (lambda v: not v, "stop sequences"), "logprobs": (lambda v: not v, "log probabilities"),
    "top_logprobs": (lambda v: not v, "log probabilities"), "logit_bias": (lambda v: not v, "logit bias"),
    "presence_penalty": (lambda v: not v, "a presence penalty"),
    "frequency_penalty": (lambda v: not v, "a frequency penalty"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        "structured output (JSON mode)"),
    "audio": (lambda v: v is None, "audio output"),
    "modalities": (lambda v: v is None or v == ["text"], "output other than text"),
}


# ---------------------------------------------------------------- errors

class ApiError(HTTPException):
    """A 4xx in OpenAI's shape; `param` names the field at fault, `code` is OpenAI's machine-readable reason."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def openai_error(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, "detail": message}


async def http_error(request, exc: HTTPException) -> JSONResponse:
    """ApiError and Starlette's own (404, 405, the body-size middleware's 413), all in OpenAI's shape."""
    body = openai_error(str(exc.detail), exc.status_code, getattr(exc, "param", None), getattr(exc, "code", None))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    return JSONResponse(openai_error(first.get("msg", "invalid request"), 400), status_code=400)


def is_prompt_too_long(error: Exception) -> bool:
    """mm.vlm.inference.PromptTooLong (a light import: the model code loads only with a checkpoint; the test
    stand-in raises the same class)."""
    from mm.vlm.inference import PromptTooLong
    return isinstance(error, PromptTooLong)


def input_error(error: Exception) -> ApiError | None:
    """The 400 for an exception the chat raises on bad input; None for anything else (a 500)."""
    message = str(error)
    if isinstance(error, (ImageTooLarge, RefTooLarge)):
        return ApiError(400, message, "messages", "image_too_large")
    if isinstance(error, NotAnImage):
        return ApiError(400, message, "messages", "invalid_image")
    if isinstance(error, (UnreadableRef, FileNotFoundError)):
        return ApiError(400, message, "messages", "invalid_image_url")
    if isinstance(error, ChatFormatError):
        return ApiError(400, message, "messages")
    if is_prompt_too_long(error):
        return ApiError(400, message, "messages", "context_length_exceeded")
    return None


# ---------------------------------------------------------------- the request

@dataclass
class CompletionRequest:
    messages: list
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """body[key] as a finite float in [low, high] ((low, high] if low_open); ApiError(400) naming the field."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number, got {json.dumps(value)[:40]}", key)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{key} must be in {bounds}, got {value:g}", key)
    return float(value)


def max_tokens_of(body: dict, default: int, cap: int) -> int:
    """max_completion_tokens (OpenAI's name today) or max_tokens (the older one), within [1, cap]."""
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    if len(given) == 2 and len(set(map(str, given.values()))) == 2:
        raise ApiError(400, "give max_completion_tokens or max_tokens, not both", "max_tokens")
    if not given:
        return min(default, cap)
    key, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer, got {json.dumps(value)[:40]}", key)
    if not 1 <= value <= cap:
        raise ApiError(400, f"{key} must be in [1, {cap}] on this server, got {value}", key)
    return value


def check_unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n must be 1: this server gives one answer per request, got {json.dumps(body['n'])[:40]}",
                       "n")
    for key, (harmless, what) in UNSUPPORTED.items():
        if key in body and not harmless(body[key]):
            raise ApiError(400, f"{key}: {what} is not supported by this server", key)


def parse_request(body, default_max_tokens: int = DEFAULT_MAX_TOKENS, cap: int = MAX_TOKENS_CAP) -> CompletionRequest:
    """The checked request; ApiError(400) for what is missing, mistyped, out of range or not offered. The messages
    themselves are checked by the chat (they are only required to be a non-empty list here)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "nothing" if messages is None else json.dumps(messages)[:40]
        raise ApiError(400, f"messages must be a non-empty list of messages, got {got}", "messages")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "model must be a string", "model")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)[:40]}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    check_unsupported(body)
    return CompletionRequest(messages, max_tokens_of(body, default_max_tokens, cap),
                             number(body, "temperature", 0.0, 0.0, 2.0), number(body, "top_p", 1.0, 0.0, 1.0, True),
                             bool(stream), bool(stream and options and options.get("include_usage")))


def image_urls(messages: list) -> list[str]:
    """Every image_url part's url string, skipping anything malformed (the chat refuses that with its reason)."""
    urls = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
            if isinstance(image, dict) and isinstance(image.get("url"), str):
                urls.append(image["url"])
    return urls


def check_image_sources(messages: list, allow_local: bool) -> None:
    """Refuse image urls this server will not follow, before the chat reads any: http(s) always (fetching what a
    client names reaches whatever this machine can: SSRF), this machine's files unless `allow_local`."""
    for url in image_urls(messages):
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", url)
        scheme = scheme.group(1).lower() if scheme else None
        if scheme in ("http", "https"):
            raise ApiError(400, f"{url[:80]}: this server does not fetch images over {scheme}; send the image "
                                "itself as a data: URL (data:image/png;base64,...)", "messages", "invalid_image_url")
        if scheme != "data" and not allow_local:
            raise ApiError(400, f"{url[:80]}: this server does not read images from its own disk; send the image "
                                "as a data: URL (data:image/png;base64,...)", "messages", "invalid_image_url")


# ---------------------------------------------------------------- the answer

def completion_body(reply, model: str, completion_id: str, created: int) -> dict:
    """OpenAI's chat.completion for a ChatReply."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": usage(reply), "system_fingerprint": None}


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def chunk(completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One chat.completion.chunk: `delta` is {"role"} first, then {"content"}, then {} with the finish reason."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def sse(obj) -> bytes:
    """One Server-Sent Event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class Slots:
    """At most `running` generations at once and `waiting` more queued; acquire() beyond that is a 429.
    Runs on the event loop (no locks needed): only the generations themselves go to worker threads."""

    def __init__(self, running: int, waiting: int):
        self.limit, self.max_waiting = running, waiting
        self.running = self.waiting = 0
        self._semaphore = asyncio.Semaphore(running)

    async def acquire(self) -> None:
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise ApiError(429, f"the server is busy: {self.running} answer(s) being generated and {self.waiting} "
                                "waiting; try again shortly", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._semaphore.release()


# ---------------------------------------------------------------- the app

def create_app(chat, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrency: int = 1, max_waiting: int = 16,
               max_tokens_cap: int = MAX_TOKENS_CAP, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               allow_local_images: bool = True) -> FastAPI:
    """The FastAPI app serving `chat` (a mm.vlm.inference.VisionChat, or anything with its interface)."""
    app = FastAPI(title="mm vision chat", description="OpenAI-compatible chat completions with images.")
    app.add_middleware(LimitRequestBody, max_bytes=max_body_bytes, error_body=openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error_handler(openai_error))
    slots = Slots(max_concurrency, max_waiting)

    @app.get("/health")
    async def health() -> dict:  # async: answered on the event loop even while every slot generates
        """Liveness, what this server runs and accepts, and how busy it is."""
        return {"status": "ok", "model": chat.name, "max_images": chat.max_images,
                "max_prompt_tokens": chat.max_prompt_tokens, "max_pixels": chat.max_pixels,
                "max_tokens": max_tokens_cap, "max_body_bytes": max_body_bytes, "local_images": allow_local_images,
                "running": slots.running, "waiting": slots.waiting, "max_concurrency": max_concurrency}

    @app.get("/v1/models")
    async def models() -> dict:
        """The one model served, as OpenAI lists models."""
        return {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0, "owned_by": "mm"}]}

    @app.post("/v1/chat/completions", responses={400: {"description": "unusable request"},
                                                 413: {"description": "body too large"},
                                                 429: {"description": "server busy"}})
    async def completions(request: Request):
        """A reply to the conversation: a chat.completion, or chat.completion.chunk events when streaming."""
        body = await read_json(request)
        req = parse_request(body, default_max_tokens, max_tokens_cap)
        check_image_sources(req.messages, allow_local_images)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        await slots.acquire()
        if req.stream:
            return await stream_reply(chat, req, slots, completion_id, created)
        try:
            reply = await run_in_threadpool(chat.chat, req.messages, max_new_tokens=req.max_tokens,
                                            temperature=req.temperature, top_p=req.top_p)
        except Exception as e:
            raise input_error(e) or e
        finally:
            slots.release()
        log.info("%s: %d prompt + %d completion tokens (%s)", completion_id, reply.prompt_tokens,
                 reply.completion_tokens, reply.finish_reason)
        return completion_body(reply, chat.name, completion_id, created)

    return app


async def read_json(request: Request):
    """The request body parsed (in a worker thread: it may be 50 MB of base64); ApiError(400) when not JSON."""
    raw = await request.body()
    try:
        return await run_in_threadpool(json.loads, raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]})") from None


async def stream_reply(chat, req: CompletionRequest, slots: Slots, completion_id: str, created: int):
    """A response of chat.completion.chunk events; the slot (already acquired) is released when the stream
    ends or the client goes away. The first piece is generated before the response starts, so bad input
    (which the chat checks at its first step) is still a 4xx rather than an error inside a 200."""
    released = False

    def release() -> None:  # from the stream's end, or the response's, if the stream never started
        nonlocal released
        if not released:
            released = True
            slots.release()

    pieces = chat.stream(req.messages, max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p)
    try:
        first = await run_in_threadpool(next_piece, pieces)
    except Exception as e:
        release()
        raise input_error(e) or e

    async def events():
        reply, piece = None, first
        try:
            yield sse(chunk(completion_id, created, chat.name, {"role": "assistant", "content": ""}))
            while not isinstance(piece, Finished):
                yield sse(chunk(completion_id, created, chat.name, {"content": piece}))
                piece = await run_in_threadpool(next_piece, pieces)
            reply = piece.reply
            finish = getattr(reply, "finish_reason", None) or "stop"
            yield sse(chunk(completion_id, created, chat.name, {}, finish))
            if req.include_usage and reply is not None:
                yield sse({**chunk(completion_id, created, chat.name, {}), "choices": [], "usage": usage(reply)})
            yield sse("[DONE]")
        except Exception as e:  # after the 200 has gone: an error event, which OpenAI's clients raise
            log.exception("%s: generation failed while streaming", completion_id, exc_info=e)
            yield sse(openai_error("internal server error (see the server log)", 500))
        finally:
            with anyio.CancelScope(shield=True):  # even when cancelled: the generation must stop, the slot free up
                await run_in_threadpool(pieces.close)  # after the piece being made, if any
            release()

    return ClosingStreamingResponse(events(), on_close=release, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator and calls `on_close` however it ends. Starlette leaves an
    iterator whose client went away to the garbage collector, and one it never started is never run at all."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.on_close()


@dataclass
class Finished:
    reply: object  # the stream's return value (a ChatReply when the chat gives one), or None


def next_piece(pieces):
    """The next text piece, or Finished with the generator's return value."""
    try:
        return next(pieces)
    except StopIteration as stop:
        return Finished(stop.value)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mm.vlm.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/vlm", help="a run folder of recipes/vlm/train.py or its export "
                                                       "(default: %(default)s)")
    add_serve_arguments(p, port=8000)
    p.add_argument("--max-concurrency", type=int, default=1, help="generations at once (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=16, help="requests queued behind them; more get a 429 "
                                                               "(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS_CAP, help="the most tokens a request may ask to "
                                                                          "generate (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="request size, images included (default: %(default)s)")
    p.add_argument("--allow-local-images", action=argparse.BooleanOptionalAction, default=None,
                   help="read image paths and file:// URLs from this machine's disk (default: only when bound to "
                        "127.0.0.1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = args.host in LOOPBACK
    if not local:
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the model"
              + ("" if args.allow_local_images else ", and image paths on this disk are refused "
                 "(--allow-local-images to accept them)"), file=sys.stderr)
    from mm.vlm.inference import VisionChat  # torch and the model code

    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    try:
        chat = VisionChat.from_checkpoint(args.model, device=device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = create_app(chat, args.max_body_bytes, args.max_concurrency, args.max_waiting, args.max_tokens,
                     min(DEFAULT_MAX_TOKENS, args.max_tokens),
                     local if args.allow_local_images is None else args.allow_local_images)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
