"""One request as the HTTP layer sees it: an async iterator of deltas that aborts when closed early."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvsched.core.errors import KVSchedError
from kvsched.engine.outputs import StepOutput

if TYPE_CHECKING:
    from kvsched.serve.async_engine import AsyncEngine


class QueueFullError(KVSchedError):
    """Too many requests are waiting for their first token (HTTP 429)."""


class EngineClosedError(KVSchedError):
    """The server is shutting down, or the engine failed (HTTP 503)."""


class RequestFailedError(KVSchedError):
    """The engine failed this request alone (finish_reason "error"; the others kept running): HTTP 500,
    or an in-band error event once a stream has started."""


@dataclass(slots=True)
class _Stream:
    accepted: asyncio.Future
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    waiting: bool = True
    finished: bool = False


class RequestHandle:
    """Async iterator over one request's :class:`StepOutput` deltas; ``close()`` ends it (aborting if
    unfinished). Its latencies are the engine's (``RequestOutput.metrics``), counted by the engine thread."""

    __slots__ = ("_engine", "request_id", "_stream", "num_prompt_tokens", "num_output_tokens",
                 "finish_reason", "_closed")  # fmt: skip

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: int,
        stream: _Stream,
        num_prompt_tokens: int,
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self._stream = stream
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self._closed = False

    async def accepted(self) -> None:
        """Returns once the engine took the request; raises the engine's error if it refused it."""
        await self._stream.accepted

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finish_reason is not None:  # the last delta was returned
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self.finish_reason = "error"
            raise item
        self.num_output_tokens += len(item.new_token_ids)
        if item.finished:
            self.finish_reason = item.finish_reason
            if item.finish_reason == "error":
                raise RequestFailedError(item.error or "the engine failed this request")
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine._release(self.request_id, self._stream)
