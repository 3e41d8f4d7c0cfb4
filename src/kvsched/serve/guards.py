"""Outermost ASGI guards: a request body size limit, and a last-resort JSON 500 for any unexpected error.

Both are pure ASGI middlewares (not route code) so they cover every path and act before FastAPI reads
the body. Without the catch-all, Starlette answers an unexpected exception with a plain-text 500 and
re-raises it, so uvicorn logs a second traceback and drops the keep-alive connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from kvsched.serve.errors import error_response, status_of

#: Default ``--max-request-bytes``: a few MB holds any prompt a model's context can take, as text.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def _message(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes (--max-request-bytes)"


class _BodyTooLarge(HTTPException):
    """The streamed body passed the limit (a chunked upload). An HTTPException, so FastAPI's body reader
    passes it on instead of turning it into a 400, and the app's handler answers the JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def _too_large(limit: int) -> Any:
    response = error_response(413, _message(limit))
    response.headers["Connection"] = "close"  # the rest of the body is never read
    return response


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(slots=True)
class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with a JSON 413: at once when Content-Length says so, else
    as soon as the bytes received pass the limit."""

    app: Any
    max_bytes: int

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope.get("headers", []))
        if declared is not None and declared > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received, started = 0, False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await _too_large(self.max_bytes)(scope, receive, send)


@dataclass(slots=True)
class CatchAllMiddleware:
    """Any exception that escapes the app becomes an OpenAI-shaped JSON 500 (logged once, no traceback
    to the client). If the response had already started, the connection cannot be saved: it is only
    logged and the server closes it."""

    app: Any

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            status, message = status_of(exc)  # logs an unexpected error, once
            if not started:
                await error_response(status, message)(scope, receive, send)


def install_guards(app: Any, max_request_bytes: int) -> None:
    """Call last in ``build_app``: middlewares added later wrap earlier ones, and these go outermost."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(CatchAllMiddleware)
