"""Every failure becomes the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvsched.core.errors import InvalidRequestError, UnsupportedFeatureError
from kvsched.serve.handle import EngineClosedError, QueueFullError
from kvsched.serve.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised by handlers: an HTTP status and a message the client can act on."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    err = ErrorInfo(message=message, type=_TYPES.get(status, "APIError"), param=param, code=status)
    return ErrorResponse(error=err).model_dump()


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def sse_error(exc: BaseException) -> str:
    """An error event for a stream that already started (the status line is already sent)."""
    status, message = status_of(exc)
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, APIError):
        return exc.status, exc.message
    if isinstance(exc, QueueFullError):
        return 429, str(exc)
    if isinstance(exc, EngineClosedError):
        return 503, str(exc)
    if isinstance(exc, InvalidRequestError | UnsupportedFeatureError):
        return 400, str(exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"malformed JSON body: {detail}".rstrip(": "), None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    async def _typed(_: Request, exc: Exception) -> JSONResponse:
        status, message = status_of(exc)
        return error_response(status, message)

    for kind in (InvalidRequestError, UnsupportedFeatureError, QueueFullError, EngineClosedError):
        app.add_exception_handler(kind, _typed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))
