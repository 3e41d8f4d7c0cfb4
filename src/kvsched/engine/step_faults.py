"""Fault containment of a step: an exception fails the requests it touched, not the engine.

Shared by the synchronous loop (``Engine.step``) and async scheduling (engine/overlap.py): which
requests a fault fails, the message each one's output carries, and the one warning logged per fault.
"""

from __future__ import annotations

import itertools
import logging

from kvsched.core.errors import KVTransferError
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.engine.outputs import StepOutput
from kvsched.engine.request_book import RequestBook, Tracked

__all__ = ["fail_requests", "step_failed_message", "victims_of"]

log = logging.getLogger("kvsched.engine")


def step_failed_message(exc: BaseException) -> str:
    """What a request failed by its step's exception reports."""
    return f"the engine failed this request: its step raised {type(exc).__name__}: {exc}"


def victims_of(
    exc: Exception, scheduled: SchedulerOutput | None, book: RequestBook
) -> tuple[list[Tracked], str] | None:
    """The requests a step's fault fails, and why; None if it is not the step's (the synchronous
    step, or async scheduling's schedule pass with ``scheduled=None``).

    A failed KV copy (:class:`KVTransferError`: nothing moved, no slot lost) fails the request whose
    suspend or resume needed it. An exception once the step was scheduled (forward pass, sampler,
    step update) fails that step's requests. Anything else (None) is the caller's to re-raise.
    """
    tracked = book.tracked
    if isinstance(exc, KVTransferError) and exc.request_id in tracked:
        return [tracked[exc.request_id]], f"the engine failed this request: {exc}"
    if scheduled is not None:
        reqs = itertools.chain(scheduled.context_requests, scheduled.generation_requests)
        return [tracked[r.request_id] for r in reqs if r.request_id in tracked], step_failed_message(exc)
    return None


def fail_requests(
    book: RequestBook, victims: list[Tracked], message: str, exc: BaseException
) -> list[StepOutput]:
    """Fail each victim (finish_reason "error", KV freed) after one warning for the fault."""
    log.warning("%s (%d request(s) failed)", message, len(victims), exc_info=exc)
    return [book.fail(t, message) for t in victims]
