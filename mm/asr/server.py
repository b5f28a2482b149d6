"""An OpenAI-compatible speech-to-text API for a speech recogniser.

    python -m mm.asr serve --checkpoint runs/asr          # or: python -m mm.asr.server; http://127.0.0.1:8000/docs
    curl -F file=@talk.flac -F response_format=srt http://127.0.0.1:8000/v1/audio/transcriptions
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").audio.transcriptions.create(model="whisper-1", file=f)

Endpoints, with OpenAI's fields and answers:
    POST /v1/audio/transcriptions   multipart: file, model (accepted, ignored), language (a code or an English
                                    name; detected when absent), prompt, response_format (json, text, srt,
                                    verbose_json, vtt), temperature, timestamp_granularities[] (segment; word
                                    is accepted but gives no word times)
    POST /v1/audio/translations     the same without language, into English; 400 if the model cannot translate
    GET  /health                    what the server runs and accepts
Binds to 127.0.0.1 unless --host says otherwise. One request at a time decodes and runs the model (the
others wait), so concurrent requests neither run the model twice at once nor hold several long
recordings decoded. Bad input gets a 4xx in OpenAI's error shape, {"error": {"message", "type":
"invalid_request_error", "param", "code"}}, with the message also as "detail":
    400 empty file, unknown or unsupported language, unknown response_format, a form field missing or
        unusable (such as no file), translation asked of a model that cannot translate, decoding
        options the model refuses (checked before the file is read)
    413 request or file over the size limit (the request's is checked before it is read), audio over
        the duration limit (checked from the file's header, before decoding)
    415 the file is not audio the server can decode (flac, wav, ogg, opus, mp3)
Anything unexpected is a JSON 500 without a trace (the trace goes to the server log).
"""
from __future__ import annotations

import argparse
import threading

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from mm.asr.formats import format_transcript, language_code, language_name
from mm.cli import add_serve_arguments
from mm.http import LimitRequestBody, internal_error_handler
from mm.media import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioTooLong, EmptyAudio, NotAudio, load_audio

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
FORM_OVERHEAD = 64 * 1024  # bytes a multipart body may carry beyond the file: boundaries, the other fields
SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                "no_speech_prob")


class ApiError(HTTPException):
    """A 4xx in OpenAI's shape; `param` names the form field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


def openai_error(message: str, status: int, param: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}, "detail": message}


async def http_error(request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(openai_error(str(exc.detail), exc.status_code, getattr(exc, "param", None)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a missing or mistyped field, as OpenAI answers it: a 400 naming the field."""
    first = exc.errors()[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request")
    return JSONResponse(openai_error(message, 400, param), status_code=400)


def check_request(transcriber, language: str | None, task: str, response_format: str,
                  granularities: list[str] | None, options: dict) -> str | None:
    """The language code to decode in (None: detect it); ApiError(400) for what the model cannot do, or
    decoding options it refuses (TranscribeOptions fields)."""
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"unknown response_format {response_format[:40]!r} (accepted: "
                            f"{', '.join(RESPONSE_FORMATS)})", "response_format")
    bad = [g for g in granularities or () if g not in GRANULARITIES]
    if bad:
        raise ApiError(400, f"unknown timestamp granularity {bad[0][:40]!r} (accepted: {', '.join(GRANULARITIES)})",
                       "timestamp_granularities")
    if task == "translate" and not transcriber.can_translate:
        raise ApiError(400, f"model {transcriber.name} cannot translate: it was trained to transcribe only")
    try:
        code = language_code(language)
    except ValueError as e:
        raise ApiError(400, str(e), "language") from None
    if code is not None and code not in transcriber.languages:
        shown = ", ".join(transcriber.languages[:20]) + (", ..." if len(transcriber.languages) > 20 else "")
        raise ApiError(400, f"language {code!r} is not one this model knows ({shown})", "language")
    try:  # an empty batch runs every check of the transcriber's and decodes nothing
        transcriber.transcribe_batch([], language=code, task=task, timestamps=True, **options)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return code


def read_audio(file: UploadFile, max_bytes: int, max_seconds: float):
    """The upload as 16 kHz mono samples; ApiError 413 (too big, too long), 400 (empty), 415 (not audio)."""
    data = file.file.read(max_bytes + 1)  # never more than one byte past the limit
    if len(data) > max_bytes:
        raise ApiError(413, f"file over the limit of {max_bytes:,} bytes", "file")
    name = (file.filename or "uploaded file")[:100]
    try:
        return load_audio(data, SAMPLE_RATE, max_seconds, name=name)
    except EmptyAudio as e:
        raise ApiError(400, str(e), "file") from None
    except AudioTooLong as e:
        raise ApiError(413, str(e), "file") from None
    except NotAudio as e:
        raise ApiError(415, str(e), "file") from None


def render(transcript, response_format: str, task: str):
    """OpenAI's answer for `response_format`: a JSON object, or text/plain."""
    if response_format == "json":
        return {"text": transcript.text.strip()}
    if response_format == "verbose_json":
        return {"task": task, "language": language_name(transcript.language), "duration": transcript.duration,
                "text": transcript.text.strip(),
                "segments": [{k: getattr(s, k) for k in SEGMENT_KEYS} for s in transcript.segments]}
    if response_format == "text":
        return PlainTextResponse(transcript.text.strip() + "\n")
    return PlainTextResponse(format_transcript(transcript, response_format))


def create_app(transcriber, max_upload_bytes: int = 25_000_000, max_seconds: float | None = None) -> FastAPI:
    """The FastAPI app serving `transcriber` (a mm.asr.transcriber.Transcriber). max_seconds: the longest
    audio accepted (default, and at most: the transcriber's own max_seconds, past which it refuses audio)."""
    max_seconds = transcriber.max_seconds if max_seconds is None else min(max_seconds, transcriber.max_seconds)
    app = FastAPI(title="mm speech recognition", description="OpenAI-compatible transcription and translation.")
    app.add_middleware(LimitRequestBody, max_bytes=max_upload_bytes + FORM_OVERHEAD, error_body=openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error_handler(openai_error))
    one_at_a_time = threading.Lock()

    def run(file: UploadFile, language: str | None, task: str, prompt: str | None, response_format: str,
            temperature: float | None, granularities: list[str] | None):
        options = {k: v for k, v in {"temperature": temperature, "initial_prompt": prompt or None}.items()
                   if v is not None}  # only what the caller set: the transcriber's defaults otherwise
        code = check_request(transcriber, language, task, response_format, granularities, options)
        with one_at_a_time:  # decoding too: at most one long recording in memory at once
            audio = read_audio(file, max_upload_bytes, max_seconds)
            transcript = transcriber.transcribe(audio, language=code, task=task, timestamps=True, **options)
        return render(transcript, response_format, task)

    @app.get("/health")
    async def health() -> dict:  # async: answered even while every worker thread waits for the model
        """Liveness, and what this server runs and accepts."""
        return {"status": "ok", "model": transcriber.name, "device": str(transcriber.device),
                "languages": list(transcriber.languages), "can_translate": transcriber.can_translate,
                "max_upload_bytes": max_upload_bytes, "max_seconds": max_seconds,
                "audio_formats": [e.lstrip(".") for e in AUDIO_EXTENSIONS]}

    errors = {400: {"description": "unusable field, empty file"}, 413: {"description": "file too big or too long"},
              415: {"description": "not audio"}}

    # Plain `def`s: FastAPI runs them in worker threads, so inference never blocks the event loop.
    @app.post("/v1/audio/transcriptions", responses=errors)
    def transcriptions(file: UploadFile = File(..., description="the audio (flac, wav, ogg, opus, mp3)"),
                       model: str | None = Form(None, description="accepted for OpenAI clients; ignored"),
                       language: str | None = Form(None, description="ISO-639-1 code or English name; "
                                                                     "detected when absent"),
                       prompt: str | None = Form(None, description="text the audio continues"),
                       response_format: str = Form("json", description=", ".join(RESPONSE_FORMATS)),
                       temperature: float | None = Form(None, ge=0.0, le=1.0),
                       timestamp_granularities: list[str] | None = Form(None, alias="timestamp_granularities[]")):
        """The audio's transcript, in its own language."""
        return run(file, language, "transcribe", prompt, response_format, temperature, timestamp_granularities)

    @app.post("/v1/audio/translations", responses=errors)
    def translations(file: UploadFile = File(..., description="the audio (flac, wav, ogg, opus, mp3)"),
                     model: str | None = Form(None, description="accepted for OpenAI clients; ignored"),
                     prompt: str | None = Form(None, description="English text the audio continues"),
                     response_format: str = Form("json", description=", ".join(RESPONSE_FORMATS)),
                     temperature: float | None = Form(None, ge=0.0, le=1.0)):
        """The audio's speech, translated into English."""
        return run(file, None, "translate", prompt, response_format, temperature, None)

    return app


def build_parser(prog: str = "python -m mm.asr.server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/asr", help="a run folder of recipes/asr/train.py, a Hugging Face "
                                                            "Whisper folder or an OpenAI .pt (default: %(default)s)")
    add_serve_arguments(p, port=8000)
    p.add_argument("--max-upload-bytes", type=int, default=25_000_000, help="file size (default: %(default)s, "
                                                                            "OpenAI's limit)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="audio duration (default: %(default)s)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m mm.asr.server") -> int:
    from mm.asr.__main__ import load_transcriber  # one message for a missing checkpoint, as the CLI's

    args = build_parser(prog).parse_args(argv)
    transcriber = load_transcriber(args.checkpoint, args.device, args.max_seconds)
    if transcriber is None:
        return 1
    app = create_app(transcriber, args.max_upload_bytes, args.max_seconds)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
