"""The draft model's KV cache follows the main one (TensorRT-LLM PR #11939, ``_prepare_draft_resources``).

After a scheduling pass, every scheduled request's draft cache is brought to the main cache's capacity:
created (with its own prefix lookup) with the first context chunk, resumed with its request, grown with
each chunk and decode. The two caches may have reused different prefixes (each has its own prefix tree
and eviction order), so the draft model may lag behind the target: the engine's draft runner computes
the draft positions it is missing before it proposes (see ``kvsched.engine.speculative``).

The draft manager writes ``context_current_position`` / ``num_reused_tokens`` on the shared Request when
it looks a prefix up or lets a fresh cache go; those fields belong to the main cache, so every draft call
here puts them back. A draft cache that cannot follow is a deliberate decision of the caller: the
request is dropped from this step (its main growth given back), never run with a short draft table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from kvsched.core.errors import UnknownRequestError
from kvsched.core.protocols import SchedulingKV, StepKV
from kvsched.core.request import Request, RequestState
from kvsched.core.scheduler.output import SchedulerOutput

_GEN = RequestState.GENERATION_IN_PROGRESS


class _Capacities(Protocol):
    def capacity(self, req: Request, /) -> int: ...
    def revert(self, req: Request, capacity: int, /) -> None: ...


@contextlib.contextmanager
def _main_positions_kept(req: Request) -> Iterator[None]:
    """Restore the main cache's view of ``req`` after a draft-manager call."""
    pos, reused = req.context_current_position, req.num_reused_tokens
    try:
        yield
    finally:
        req.context_current_position, req.num_reused_tokens = pos, reused


class DraftMirror:
    """Keeps ``draft`` at ``main``'s capacity for scheduled requests; suspends and frees with it."""

    __slots__ = ("main", "draft")

    def __init__(self, main: _Capacities, draft: SchedulingKV) -> None:
        self.main = main
        self.draft = draft

    def follow(self, req: Request) -> bool:
        """Create / resume the draft cache of ``req`` and grow it to the main capacity; False if short."""
        target = self.main.capacity(req)
        draft = self.draft
        with _main_positions_kept(req):
            if not draft.prepare_context(req):
                return False
            return draft.resize_context(req, max(0, target - req.context_current_position))

    def follow_output(self, out: SchedulerOutput) -> list[Request]:
        """Mirror every scheduled request; returns the ones whose draft cache could not follow."""
        return [r for rs in (out.context_requests, out.generation_requests) for r in rs if not self.follow(r)]

    def can_suspend(self, req: Request) -> bool:
        """The draft side of a suspension: nothing to move, or the draft host tier can take it."""
        draft = self.draft
        return not draft.is_request_active(req.request_id) or draft.can_suspend(req)

    def suspend(self, req: Request) -> None:
        with _main_positions_kept(req):
            self.draft.suspend_request(req)

    def free(self, req: Request) -> None:
        with contextlib.suppress(UnknownRequestError):
            self.draft.free_request(req)


def drop_from_output(kv: _Capacities, out: SchedulerOutput, dropped: Sequence[Request]) -> None:
    """Take ``dropped`` out of ``out`` and give their growth of this step back (capacity -> history).

    The baselines' counterpart of ``UnifiedScheduler.drop_scheduled``: the request's state is untouched,
    so the next step schedules it again.
    """
    if not dropped:
        return
    ids = {r.request_id for r in dropped}
    for req in dropped:
        drafts = len(req.draft_tokens)
        if req in out.generation_requests:
            out.num_scheduled_tokens -= 1 + drafts
        else:
            last = req.context_chunk_size >= req.context_remaining_length
            out.num_scheduled_tokens -= req.context_chunk_size + (drafts if last else 0)
        kv.revert(req, 0)  # capacity back to the request's history
    out.context_requests = [r for r in out.context_requests if r.request_id not in ids]
    out.generation_requests = [r for r in out.generation_requests if r.request_id not in ids]


def reserve_draft_slots(active: Iterable[Request], k: int) -> None:
    """Before a pass: each generation gets ``k`` draft slots (fewer near ``max_new_tokens``), so the
    scheduler counts ``1 + k`` tokens and KV for it; contexts carry none. The proposer fills the slots
    of the scheduled requests after the pass (TensorRT-LLM reserves the maximum draft length the same
    way before scheduling)."""
    for req in active:
        if req.state == _GEN:
            n = min(k, req.max_new_tokens - len(req.output_token_ids) - 1)
            if n > 0:
                req.draft_tokens = [0] * n
                continue
        if req.draft_tokens:
            req.draft_tokens = []


class BothCaches:
    """The step update's KV (``StepKV``) when a draft cache follows the main one: history advances in
    the main cache (the draft's is advanced by whoever runs the draft), and a finished request frees
    both. One class for the engine and the simulator."""

    __slots__ = ("main", "draft")

    def __init__(self, main: StepKV, draft: SchedulingKV) -> None:
        self.main = main
        self.draft = draft

    def advance(self, req: Request, num_tokens: int) -> None:
        self.main.advance(req, num_tokens)

    def free_request(self, req: Request) -> None:
        try:
            self.main.free_request(req)
        finally:
            with contextlib.suppress(UnknownRequestError):
                self.draft.free_request(req)
