"""API-key authentication of ``kvsched serve`` (``--api-key`` / ``KVSCHED_API_KEY``), in one place.

A pure ASGI middleware rather than a route dependency, so that it is deny-by-default: every path needs
``Authorization: Bearer <key>`` except ``/health`` (and ``/metrics`` with ``--metrics-open``). That covers
the OpenAI routes, ``/metrics``, FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json``, paths that do not
exist (an unauthenticated client learns nothing about which routes exist) and every request before its
body is read or validated. The key is compared with ``hmac.compare_digest`` (constant time), as vLLM's
``--api-key`` check does. Refusals are OpenAI-shaped 401s with ``WWW-Authenticate: Bearer`` (RFC 6750).
"""

from __future__ import annotations

import hmac
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.serve.errors import error_response

ENV_VAR = "KVSCHED_API_KEY"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
_KEY_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


def check_api_key(key: str) -> str:
    """A key a client can send in a header: non-empty printable ASCII without spaces (HTTP clients strip
    or mangle anything else, so such a key could never match). Raises ConfigError naming the problem."""
    if not key:
        raise ConfigError(
            "the API key is empty: pass a non-empty --api-key (or unset it to serve without one)"
        )
    bad = sorted({c for c in key if c not in _KEY_CHARS})
    if bad:
        raise ConfigError(
            f"the API key holds {len(bad)} character(s) a Bearer header cannot carry ({bad[0]!r}...): "
            "use printable ASCII without spaces"
        )
    return key


def resolve_api_key(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """``--api-key`` wins over ``KVSCHED_API_KEY``; an empty variable counts as unset (an empty flag is an
    error: it would otherwise switch authentication off silently)."""
    if flag is not None:
        return check_api_key(flag)
    value = environ.get(ENV_VAR) or None
    return None if value is None else check_api_key(value)


def open_paths(metrics_open: bool) -> frozenset[str]:
    """Paths served without the key: the health check always, the metrics only if asked for."""
    return frozenset({HEALTH_PATH, METRICS_PATH} if metrics_open else {HEALTH_PATH})


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


@dataclass(slots=True)
class APIKeyMiddleware:
    """ASGI middleware: a request to any path outside ``public`` needs the Bearer ``api_key``."""

    app: Any
    api_key: str
    public: frozenset[str] = frozenset({HEALTH_PATH})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        if token is not None and hmac.compare_digest(token, self.api_key.encode("ascii")):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send the header `Authorization: Bearer <key>`"
            if token is None
            else "invalid API key"
        )
        response = error_response(401, message)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
