"""The engine in its own thread, fed by HTTP handlers without ever blocking either side.

Handlers call :meth:`AsyncEngine.submit` (event-loop thread) and iterate the returned
:class:`RequestHandle`. Commands (add / abort / stop) cross to the engine thread through a deque and an
Event; step outputs cross back in one ``loop.call_soon_threadsafe`` per step and are routed to per-request
asyncio queues in the loop thread, so the routing table needs no lock. Closing a handle before its
request finished (client gone, handler error) aborts it in the engine, which frees its KV at once.
Each request's end is counted in the Prometheus metrics here, on the engine thread, from the engine's
result (``RequestOutput.metrics``: the one record of its arrival, first token, last token and finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from kvsched.core.request import SamplingParams
from kvsched.engine.outputs import RequestOutput, StepOutput
from kvsched.serve.backend import Backend
from kvsched.serve.handle import EngineClosedError, QueueFullError, RequestHandle, _Stream
from kvsched.serve.metrics import ServerMetrics

T = TypeVar("T")


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # the caller went away
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


class AsyncEngine:
    """Runs ``backend`` in a daemon thread. Start it from inside the event loop (server lifespan)."""

    def __init__(
        self,
        backend: Backend,
        metrics: ServerMetrics | None = None,
        *,
        max_waiting: int = 1024,
        snapshot_interval_s: float = 0.05,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._snapshot_interval = snapshot_interval_s
        self._ids = itertools.count()
        self._streams: dict[int, _Stream] = {}  # loop thread only
        self._num_waiting = 0  # loop thread only
        self._cmds: deque[tuple] = deque()
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stop = False
        self.error: BaseException | None = None
        self._last_snapshot = 0.0

    # -- loop-thread API -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvsched-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        *,
        cache_salt: int | None = None,
        lora: str | None = None,
        session: str | None = None,
    ) -> RequestHandle:
        """Queue a request (never blocks). Raises QueueFullError or EngineClosedError.

        ``priority``: higher = more important (used by an engine in priority mode). ``cache_salt``:
        the request's prefix-cache scope (``serve/tenancy.py``); None shares the unsalted cache.
        ``lora``: the LoRA adapter's name (the request's ``model``), None for the base model.
        ``session``: the conversation (the OpenAI ``user`` field), passed on only to a backend that
        routes by it (``accepts_sessions``: engine replicas with a sticky or KV-aware router).

        ``params`` go to the engine as they are: it decides every stop (EOS, length, stop token ids,
        stop strings with hold-back) and its text deltas and finish reasons are streamed unchanged.
        """
        if not self.is_running:
            raise EngineClosedError(
                "the server is shutting down" if self._closing else "the engine is not running"
            )
        if self._num_waiting >= self.max_waiting:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise QueueFullError(f"too many requests waiting ({self._num_waiting}); retry later")
        rid = next(self._ids)
        stream = _Stream(self._loop.create_future())
        self._streams[rid] = stream
        self._num_waiting += 1
        cmd = ("add", rid, prompt_token_ids, params, priority, time.monotonic(), cache_salt, lora, session)
        self._command(cmd)
        return RequestHandle(self, rid, stream, len(prompt_token_ids))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its error):
        how the server changes engine state such as the LoRA adapter registry without a lock. Commands
        run in order, so a request submitted after ``call`` returns sees the change."""
        if not self.is_running:
            raise EngineClosedError(
                "the server is shutting down" if self._closing else "the engine is not running"
            )
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._command(("call", fn, fut))
        return await fut

    def _release(self, rid: int, stream: _Stream) -> bool:
        """Forget a request; abort it in the engine if it had not finished. True if aborted."""
        if self._streams.pop(rid, None) is None:
            return False
        if stream.waiting:
            self._num_waiting -= 1
        if stream.finished:
            return False
        self._command(("abort", rid))
        return True

    async def drain(self, timeout_s: float, grace_s: float = 5.0) -> None:
        """Refuse new requests, let open ones finish for up to ``timeout_s``, then fail the rest with
        EngineClosedError: each handler still runs, so a stream ends with an in-band error event and
        ``data: [DONE]``, and a non-streaming request gets a JSON 503. Waits up to ``grace_s`` for those
        handlers to let go. Called when the HTTP server starts shutting down (``serve/server_thread.py``),
        before uvicorn's own graceful timeout would cancel the handlers mid-body."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self._streams or self._thread is None or not self._thread.is_alive():
            return
        reason = f"the server shut down before the request finished (drain timeout {timeout_s:g} s)"
        self._command(("fail_all", reason))
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Drain (see :meth:`drain`; at once if the server already did), then stop the engine thread."""
        await self.drain(drain_timeout_s)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    def _command(self, cmd: tuple) -> None:
        self._cmds.append(cmd)
        self._wake.set()

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # closed by its handler; an abort is on its way
            if stream.waiting:
                stream.waiting = False
                self._num_waiting -= 1
            if out.finished:
                stream.finished = True
            stream.queue.put_nowait(out)

    def _accept(self, rids: list[int]) -> None:
        for rid in rids:
            stream = self._streams.get(rid)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(None)

    def _fail(self, rids: list[int], exc: BaseException) -> None:
        for rid in rids:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            stream.finished = True
            if stream.accepted.done():
                stream.queue.put_nowait(exc)
            else:
                stream.accepted.set_exception(exc)

    # -- engine thread ---------------------------------------------------------------------------
    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        backend, live = self.backend, set()
        while True:
            self._wake.clear()
            accepted: list[int] = []
            while self._cmds:
                self._apply(self._cmds.popleft(), live, accepted)
            if accepted:
                self._to_loop(self._accept, accepted)
            if self._stop:
                break
            if not backend.has_unfinished_requests():
                self._publish(force=True)
                self._wake.wait(0.5)
                continue
            try:
                outputs = backend.step()
            except Exception as exc:  # engine bug or deadlock: fail every request, keep serving
                self._abort_all(live, EngineClosedError(f"the engine failed: {type(exc).__name__}: {exc}"))
                self.error = exc
                continue
            if outputs:
                self._to_loop(self._dispatch, outputs)
                for out in outputs:
                    if out.finished:
                        live.discard(out.request_id)
                        self._observe(out.finish_reason or "error", backend.release(out.request_id))
            self._publish()
        self._abort_all(live, EngineClosedError("the server shut down before the request finished"))
        self._publish(force=True)

    def _apply(self, cmd: tuple, live: set[int], accepted: list[int]) -> None:
        if cmd[0] == "add":
            _, rid, token_ids, params, priority, arrival, salt, lora, session = cmd
            extra: dict[str, Any] = {} if lora is None else {"lora": lora}
            if session is not None and getattr(self.backend, "accepts_sessions", False):
                extra["session"] = session
            try:
                self.backend.add_request(token_ids, params, rid, priority, arrival, salt, **extra)
            except Exception as exc:  # bad request: fail it alone
                self._to_loop(self._fail, [rid], exc)
                self._observe("error", None)
                return
            live.add(rid)
            accepted.append(rid)
        elif cmd[0] == "abort" and cmd[1] in live:
            live.discard(cmd[1])
            self._observe("abort", self.backend.abort_request(cmd[1]))
        elif cmd[0] == "fail_all":
            self._abort_all(live, EngineClosedError(cmd[1]))
        elif cmd[0] == "call":
            _, fn, fut = cmd
            try:
                result = fn()
            except Exception as exc:  # the caller's error, raised in its handler
                self._to_loop(_settle, fut, None, exc)
            else:
                self._to_loop(_settle, fut, result, None)

    def _abort_all(self, live: set[int], exc: BaseException) -> None:
        for rid in live:
            result = None
            with contextlib.suppress(Exception):  # best effort while failing everything
                result = self.backend.abort_request(rid)
            self._observe("error", result)
        if live:
            self._to_loop(self._fail, list(live), exc)
        live.clear()

    def _observe(self, finish_reason: str, result: RequestOutput | None) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(finish_reason, result)

    def _publish(self, force: bool = False) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if force or now - self._last_snapshot >= self._snapshot_interval:
            self._last_snapshot = now
            self.metrics.update_engine(self.backend.snapshot())
