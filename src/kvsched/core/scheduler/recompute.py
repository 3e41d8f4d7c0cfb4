"""The recompute baseline, shaped like vLLM v1's scheduler.

Running requests (admitted earlier, in admission order) are served first. One that cannot grow
preempts the most recently admitted running request: its KV is freed (the prefix cache may keep
published blocks) and it is reset to prefill prompt + outputs again. Waiting requests are admitted
FCFS only when nothing was preempted this step.

KV manager members used: ``prepare_context``, ``resize_context``, ``try_allocate_generation``,
``suspend_request`` (to let go of a fresh cache that was prepared but not admitted), ``free_request``,
``tokens_per_block``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from kvsched.core.config import CapacityPolicy, check_capacity_policy
from kvsched.core.errors import UnknownRequestError
from kvsched.core.protocols import PeftPages, SchedulingKV
from kvsched.core.request import Request
from kvsched.core.scheduler.common import (
    CONTEXT_INIT,
    GENERATION_COMPLETE,
    GENERATION_IN_PROGRESS,
    SchedulerBase,
    as_id_set,
    check_fits_budget,
    order_requests,
    sort_output,
)
from kvsched.core.scheduler.draft_mirror import DraftMirror, drop_from_output
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.scheduler.pages import PageBudget


class RecomputeScheduler(SchedulerBase):
    """Running first, preempt-by-recompute from the newest, admit waiting only without preemption."""

    def __init__(
        self,
        kv_cache_manager: SchedulingKV,
        *,
        max_batch_size: int,
        max_num_tokens: int | None = None,
        chunk_unit_size: int | None = None,
        peft_cache: PeftPages | None = None,
        draft_kv_cache_manager: SchedulingKV | None = None,
        priority_mode: bool = False,
        policy: CapacityPolicy
        | str
        | None = None,  # the baselines' common keyword; this one has no capacity stage
    ) -> None:
        check_capacity_policy("recompute", policy)  # a given policy would be ignored: refused
        self._init_common(
            kv_cache_manager, max_batch_size, max_num_tokens, chunk_unit_size,
            peft_cache, draft_kv_cache_manager, priority_mode,
        )  # fmt: skip
        draft = draft_kv_cache_manager
        self._mirror = None if draft is None else DraftMirror(kv_cache_manager, draft)
        self._running: list[Request] = []  # admission order
        self._running_ids: set[int] = set()

    def schedule(
        self, active_requests: Sequence[Request], inflight_request_ids: Iterable[int] = frozenset()
    ) -> SchedulerOutput:
        inflight = as_id_set(inflight_request_ids) or frozenset()
        self._prune()
        pages = PageBudget(self.peft_cache)
        max_reqs = self.max_batch_size
        running = self._running
        ctx: list[Request] = []
        gen: list[Request] = []
        preempted: list[Request] = []
        left = self._max_tokens
        k = 0
        while k < len(running) and len(ctx) + len(gen) < max_reqs:
            req = running[k]
            k += 1
            state = req.state
            if req.request_id in inflight or state not in (CONTEXT_INIT, GENERATION_IN_PROGRESS):
                continue
            need = pages.need(req)
            if need is None:
                continue
            is_gen = state == GENERATION_IN_PROGRESS
            cost = 1 + len(req.draft_tokens) if is_gen else self._chunk(req, left)
            if cost <= 0 or cost > left:
                break
            ok = self._grow(req, cost, is_gen)
            while not ok:
                # Victims come from the tail, so the request itself goes last (never one before it).
                victim = self._pop_victim(inflight)
                if victim is None:
                    break
                self._preempt(victim, preempted)
                if victim is req:
                    break
                ok = self._grow(req, cost, is_gen)
            if not ok:
                break
            (gen if is_gen else ctx).append(req)
            left -= cost
            pages.commit(req, need)
        if not preempted:
            reqs = order_requests(active_requests, self.priority_mode)
            left = self._admit(reqs, inflight, ctx, gen, pages, left)
        has_lora = any(r.lora_id is not None for r in ctx) or any(r.lora_id is not None for r in gen)
        chunked = any(not r.is_last_context_chunk for r in ctx)
        ctx = sort_output(ctx, gen, has_lora, chunked)
        out = SchedulerOutput(ctx, gen, [], preempted, self._max_tokens - left)
        if self._mirror is not None:  # the draft cache follows (TensorRT-LLM's _prepare_draft_resources)
            drop_from_output(self.kv_cache_manager, out, self._mirror.follow_output(out))
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Forget running requests that finished since the last step."""
        if any(r.state == GENERATION_COMPLETE for r in self._running):
            self._running = [r for r in self._running if r.state != GENERATION_COMPLETE]
            self._running_ids = {r.request_id for r in self._running}

    def _chunk(self, req: Request, left: int) -> int:
        """This step's cost of a context: its remainder, or a unit-rounded chunk when chunking."""
        remaining = req.context_remaining_length
        unit = self.chunk_unit_size
        if remaining <= left or unit is None:
            chunk = remaining
        else:
            chunk = left - left % unit
        req.context_chunk_size = chunk
        return chunk + len(req.draft_tokens) if chunk == remaining else chunk

    def _grow(self, req: Request, cost: int, is_gen: bool) -> bool:
        kv = self.kv_cache_manager
        if is_gen:
            return kv.try_allocate_generation(req)
        return kv.prepare_context(req) and kv.resize_context(req, cost)

    def _pop_victim(self, inflight: AbstractSet[int]) -> Request | None:
        """The most recently admitted running request that is not executing right now."""
        running = self._running
        for j in range(len(running) - 1, -1, -1):
            victim = running[j]
            if victim.request_id not in inflight:
                del running[j]
                return victim
        return None

    def _preempt(self, req: Request, preempted: list[Request]) -> None:
        self._running_ids.discard(req.request_id)
        with contextlib.suppress(UnknownRequestError):
            self.kv_cache_manager.free_request(req)
        if self.draft_kv_cache_manager is not None:
            with contextlib.suppress(UnknownRequestError):
                self.draft_kv_cache_manager.free_request(req)
        req.reset_for_recompute()
        preempted.append(req)

    def _admit(
        self,
        reqs: Sequence[Request],
        inflight: AbstractSet[int],
        ctx: list[Request],
        gen: list[Request],
        pages: PageBudget,
        left: int,
    ) -> int:
        """FCFS admission of waiting contexts; the first one that does not fit ends it.

        Returns the token budget left.
        """
        kv = self.kv_cache_manager
        running_ids = self._running_ids
        for req in reqs:
            if len(ctx) + len(gen) >= self.max_batch_size:
                break
            rid = req.request_id
            if rid in running_ids or rid in inflight or req.state != CONTEXT_INIT:
                continue
            need = pages.need(req)
            if need is None:
                continue
            if not kv.prepare_context(req):
                break
            check_fits_budget(req, self._max_tokens, self.chunk_unit_size)
            cost = self._chunk(req, left)
            if cost <= 0 or cost > left:
                kv.suspend_request(req)  # let go of the fresh cache (its reused prefix stays cached)
                break
            if not kv.resize_context(req, cost):
                break
            ctx.append(req)
            left -= cost
            pages.commit(req, need)
            self._running.append(req)
            running_ids.add(rid)
        return left
