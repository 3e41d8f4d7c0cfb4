"""The unified single-pass scheduler (TensorRT-LLM PR #11939, ``KVCacheV2Scheduler``).

Scheduling and KV allocation happen in one pass: generation requests first (list order), each one
allocated on the spot; when the device tier is full, started requests are suspended from the tail to
the host tier (KV kept) and resume by themselves the next time they are allocated. Contexts seen before
the pass stopped come second and take the token budget the generations left.

KV manager members used: ``prepare_context``, ``resize_context``, ``try_allocate_generation``,
``suspend_request``, ``is_request_active``, ``tokens_per_block``; read-only ``capacity(req)`` for
each scheduled context, and ``revert`` — both only so that :meth:`UnifiedScheduler.drop_scheduled`
can undo a step. PEFT cache: ``max_device_pages``,
``num_pages(req)`` and, if present, ``acquire(req)`` (a request was scheduled with its adapter) and
``release(req)`` (a request was suspended: it no longer pins its adapter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvsched.core.errors import SchedulerDeadlockError
from kvsched.core.request import Request
from kvsched.core.scheduler.common import (
    CONTEXT_INIT,
    GENERATION_IN_PROGRESS,
    GENERATION_TO_COMPLETE,
    SchedulerBase,
    as_id_set,
    is_started,
    order_requests,
    sort_output,
)
from kvsched.core.scheduler.contexts import ContextPhase
from kvsched.core.scheduler.output import SchedulerOutput

_RUN, _BUDGET, _KV = 0, 1, 2  # why the generation phase ended
_NO_IDS: Any = frozenset()


class UnifiedScheduler(SchedulerBase):
    """One pass per step over ``active_requests``; see the module docstring and docs/architecture.md."""

    #: Consecutive steps that schedule nothing because KV ran out (suspend/resume ping-pong) before
    #: the scheduler gives up with :class:`SchedulerDeadlockError`.
    STALL_LIMIT = 8

    def __init__(
        self,
        kv_cache_manager: Any,
        *,
        max_batch_size: int,
        max_num_tokens: int | None = None,
        chunk_unit_size: int | None = None,
        peft_cache: Any = None,
        draft_kv_cache_manager: Any = None,
        priority_mode: bool = False,
    ) -> None:
        self._init_common(
            kv_cache_manager, max_batch_size, max_num_tokens, chunk_unit_size,
            peft_cache, draft_kv_cache_manager, priority_mode,
        )  # fmt: skip
        # Bound methods kept once: the hot loop must not look attributes up per request.
        self._try_alloc = kv_cache_manager.try_allocate_generation
        self._is_active = kv_cache_manager.is_request_active
        self._suspend_kv = kv_cache_manager.suspend_request
        draft = self.draft_kv_cache_manager
        self._draft_suspend = None if draft is None else draft.suspend_request
        self._peft_release = getattr(peft_cache, "release", None)
        self._peft_acquire = getattr(peft_cache, "acquire", None)
        self._contexts = ContextPhase(kv_cache_manager, self._max_tokens, max_batch_size, chunk_unit_size)
        self._stalled_steps = 0

    # -- the pass --------------------------------------------------------------------------------
    def schedule(
        self, active_requests: Sequence[Request], inflight_request_ids: Iterable[int] = frozenset()
    ) -> SchedulerOutput:
        reqs = order_requests(active_requests, True) if self.priority_mode else active_requests
        inflight = as_id_set(inflight_request_ids) if inflight_request_ids else None
        max_tokens = self._max_tokens
        max_reqs = self.max_batch_size
        peft = self.peft_cache
        try_alloc = self._try_alloc
        peft_acquire = self._peft_acquire
        gen_state = GENERATION_IN_PROGRESS
        ctx_state = CONTEXT_INIT

        gen: list[Request] = []
        pending: list[Request] = []
        paused: list[Request] = []
        gen_append = gen.append
        pending_append = pending.append
        num_tokens = num_reqs = claimed = max_pages = 0
        lora_ids: set[int] = _NO_IDS  # only grows when a PEFT cache counts pages
        has_lora = False
        if peft is not None:
            lora_ids = set()
            max_pages = peft.max_device_pages
            claimed = self._pre_claim(reqs, lora_ids)

        stop = _RUN
        end = len(reqs)
        for i, req in enumerate(reqs):
            if i >= end:
                break
            if inflight is not None and req.request_id in inflight:
                continue
            state = req.state
            if state == gen_state:
                if num_reqs >= max_reqs:
                    stop = _BUDGET
                    break
                drafts = req.draft_tokens
                cost = 1 + len(drafts) if drafts else 1
                if num_tokens + cost > max_tokens:
                    stop = _BUDGET
                    break
                lora = req.lora_id
                if lora is None:
                    if not try_alloc(req):
                        ok, end = self._evict_tail(reqs, i, end, req, paused, inflight)
                        if not ok:
                            self._self_evict(req, paused)
                            stop = _KV
                            break
                    gen_append(req)
                    num_tokens += cost
                    num_reqs += 1
                    continue
                # With a LoRA adapter: pages are checked before and committed after the allocation.
                has_lora = True
                pages = 0
                if peft is not None and lora not in lora_ids:
                    pages = peft.num_pages(req)
                    if claimed + pages > max_pages:
                        stop = _BUDGET
                        break
                if not try_alloc(req):
                    ok, end = self._evict_tail(reqs, i, end, req, paused, inflight)
                    if not ok:
                        self._self_evict(req, paused)
                        stop = _KV
                        break
                gen_append(req)
                num_tokens += cost
                num_reqs += 1
                if pages:
                    claimed += pages
                    lora_ids.add(lora)
                if peft_acquire is not None:
                    peft_acquire(req)
            elif state == ctx_state:
                pending_append(req)

        ctx: list[Request] = []
        chunked = False
        if pending:
            num_tokens, num_reqs, claimed, ctx_lora, chunked = self._contexts.run(
                pending, ctx, num_tokens, num_reqs, claimed, max_pages, lora_ids, peft, peft_acquire
            )
            has_lora = has_lora or ctx_lora

        if not gen and not ctx:
            self._check_deadlock(stop, paused)
        else:
            self._stalled_steps = 0
        if has_lora or chunked:
            ctx = sort_output(ctx, gen, has_lora, chunked)
        return SchedulerOutput(ctx, gen, paused, [], num_tokens)

    # -- pieces ----------------------------------------------------------------------------------
    def _pre_claim(self, reqs: Sequence[Request], lora_ids: set[int]) -> int:
        """Adapters of requests finishing this step stay resident: count their pages first."""
        peft = self.peft_cache
        claimed = 0
        for r in reqs:
            lora = r.lora_id
            if lora is not None and r.state == GENERATION_TO_COMPLETE and lora not in lora_ids:
                claimed += peft.num_pages(r)
                lora_ids.add(lora)
        return claimed

    def _suspend(self, req: Request) -> None:
        self._suspend_kv(req)
        if self._draft_suspend is not None:
            self._draft_suspend(req)
        if self._peft_release is not None:
            self._peft_release(req)

    def _self_evict(self, req: Request, paused: list[Request]) -> None:
        """Nothing after it could make room: suspend the failing request itself (if it holds KV)."""
        if self._is_active(req.request_id):
            self._suspend(req)
            paused.append(req)

    def _evict_tail(
        self,
        reqs: Sequence[Request],
        i: int,
        end: int,
        req: Request,
        paused: list[Request],
        inflight: Iterable[int] | None,
    ) -> tuple[bool, int]:
        """Suspend started, active requests from the tail (never ``i`` or before) until ``req`` fits.

        In priority mode the list is sorted by priority, so the tail holds the lowest priorities and
        the same scan picks the lowest-priority victim nearest the tail. In-flight requests are spared.
        """
        is_active = self._is_active
        j = end - 1
        while j > i:
            victim = reqs[j]
            if (
                is_started(victim)
                and (inflight is None or victim.request_id not in inflight)
                and is_active(victim.request_id)
            ):
                self._suspend(victim)
                paused.append(victim)
                end = j
                if self._try_alloc(req):
                    return True, end
            j -= 1
        return False, end

    def _check_deadlock(self, stop: int, paused: list[Request]) -> None:
        """Raise only when KV allocation (not a token/batch/LoRA budget) stopped every request."""
        if stop != _KV:
            self._stalled_steps = 0
            return
        self._stalled_steps += 1
        if paused and self._stalled_steps < self.STALL_LIMIT:
            return
        detail = (
            "none could be scheduled or evicted"
            if not paused
            else f"nothing was scheduled for {self._stalled_steps} steps in a row"
        )
        raise SchedulerDeadlockError(
            f"unified scheduler deadlock: generation requests are active but {detail}: the device KV "
            "pool is exhausted. Configure a host tier (CacheConfig.num_host_blocks > 0) so requests can "
            "be suspended, or give the device more blocks (CacheConfig.num_device_blocks)."
        )

    # -- after the pass --------------------------------------------------------------------------
    def drop_scheduled(self, output: SchedulerOutput, dropped: Iterable[Request]) -> None:
        """Undo the KV growth of scheduled requests that a later filter drops (as TensorRT-LLM's
        ``revert_allocate_context`` does).

        Each dropped request gets ``kv.revert(req, capacity before this step)`` and leaves ``output``;
        its state is untouched, so the next step schedules it again.
        """
        drop_ids = {r.request_id for r in dropped}
        if not drop_ids:
            return
        kv = self.kv_cache_manager
        old_ctx = self._contexts.old_capacity
        for req in output.context_requests:
            if req.request_id in drop_ids:
                kv.revert(req, old_ctx[req.request_id])
                output.num_scheduled_tokens -= self._contexts.cost_of(req)
        for req in output.generation_requests:
            if req.request_id in drop_ids:
                grown = 1 + len(req.draft_tokens)
                kv.revert(req, kv.capacity(req) - grown)
                output.num_scheduled_tokens -= grown
        output.context_requests = [r for r in output.context_requests if r.request_id not in drop_ids]
        output.generation_requests = [r for r in output.generation_requests if r.request_id not in drop_ids]
