"""Every failure becomes the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvsched.core.errors import InvalidRequestError, UnsupportedFeatureError
from kvsched.serve.handle import EngineClosedError, QueueFullError, RequestFailedError
from kvsched.serve.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
#: Seconds a client should wait after a 429 (overload) before retrying: the ``Retry-After`` header.
RETRY_AFTER_S = 1
log = logging.getLogger("kvsched.serve")


class APIError(Exception):
    """Raised by handlers: an HTTP status and a message the client can act on."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _printable(text: str) -> str:
    """Text a JSON body can carry: a lone surrogate echoed from the request is written as ``\\udXXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    err = ErrorInfo(
        message=_printable(message),
        type=_TYPES.get(status, "APIError"),
        param=None if param is None else _printable(param),
        code=status,
    )
    return ErrorResponse(error=err).model_dump()


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The JSON error; a 429 says when to retry (``Retry-After``, RFC 9110 §10.2.3)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


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
    if isinstance(exc, RequestFailedError):  # the engine's own words, meant for the client; logged there
        return 500, str(exc)
    if isinstance(exc, InvalidRequestError | UnsupportedFeatureError):
        return 400, str(exc)
    # An unexpected error: its text may hold internals, so the client gets the type only; logged once, here.
    log.error("unexpected error while serving a request", exc_info=exc)
    return 500, f"internal server error ({type(exc).__name__}); the server log has the details"


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

    for kind in (
        InvalidRequestError,
        UnsupportedFeatureError,
        QueueFullError,
        EngineClosedError,
        RequestFailedError,
    ):
        app.add_exception_handler(kind, _typed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _body_problem(exc.__cause__) or str(exc.detail))


def _body_problem(cause: BaseException | None) -> str | None:
    """FastAPI says only "There was an error parsing the body"; name the two causes a client can fix."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 JSON: {cause.reason} at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    return None
