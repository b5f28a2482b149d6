"""What mm's HTTP servers share: a request-body size limit enforced before parsing, and a JSON 500 that
keeps the trace in the server log.

    app.add_middleware(LimitRequestBody, max_bytes=limit)
    app.add_exception_handler(Exception, internal_error)

Both answer with {"detail": message} unless given another `error_body(message, status) -> dict`, so a
server speaking another API's error shape (the ASR server speaks OpenAI's) uses the same pieces.
"""
from __future__ import annotations

import logging
from typing import Callable

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("mm.http")
INTERNAL_ERROR = "internal server error (see the server log)"


def detail_body(message: str, status: int) -> dict:
    """FastAPI's own error shape: {"detail": message}."""
    return {"detail": message}


class LimitRequestBody:
    """ASGI middleware: answer 413 for request bodies over `max_bytes`, before they are parsed or spooled.

    Checks Content-Length when sent, and counts streamed bytes otherwise (chunked uploads). A body over
    the limit without a Content-Length raises HTTPException(413) while the app reads it, which the app's
    own HTTPException handler renders.
    """

    def __init__(self, app, max_bytes: int, error_body: Callable[[str, int], dict] = detail_body):
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # an HTTPException passes through FastAPI's body parsing as itself
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counting_receive, send)

    def message(self) -> str:
        return f"request body over the limit of {self.max_bytes:,} bytes"

    def too_large(self) -> JSONResponse:
        return JSONResponse(self.error_body(self.message(), 413), status_code=413)


def internal_error_handler(error_body: Callable[[str, int], dict] = detail_body):
    """An exception handler answering a JSON 500 without the trace, which goes to the server log."""

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(INTERNAL_ERROR, 500), status_code=500)

    return internal_error


internal_error = internal_error_handler()  # {"detail": ...}
