"""The unified single-pass scheduler (TensorRT-LLM PR #11939, ``KVCacheV2Scheduler``).

Scheduling and KV allocation happen in one pass: generation requests first (list order), each one
allocated on the spot; when the device tier is full, started requests are suspended from the tail to
the host tier (KV kept) and resume by themselves the next time they are allocated. Contexts seen before
the pass stopped come second and take the token budget the generations left; a started context that
cannot grow suspends started contexts behind it the same way.

The KV manager is a :class:`~kvsched.core.protocols.SchedulingKV` (``capacity`` and ``revert`` only
so that :meth:`UnifiedScheduler.drop_scheduled` can undo a step); the PEFT cache a
:class:`~kvsched.core.protocols.PeftPages`: ``acquire`` when a request is scheduled with its adapter,
``release`` when it is suspended (it no longer pins its adapter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from kvsched.core.errors import SchedulerDeadlockError
from kvsched.core.protocols import PeftPages, SchedulingKV
from kvsched.core.request import Request
from kvsched.core.scheduler.budget import StepBudget
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
from kvsched.core.scheduler.draft_mirror import DraftMirror
from kvsched.core.scheduler.output import SchedulerOutput

_RUN, _BUDGET, _KV = 0, 1, 2  # why the generation phase ended


class UnifiedScheduler(SchedulerBase):
    """One pass per step over ``active_requests``; see the module docstring and docs/architecture.md."""

    #: Consecutive steps that schedule nothing because KV ran out (suspend/resume ping-pong) before
    #: the scheduler gives up with :class:`SchedulerDeadlockError`.
    STALL_LIMIT = 8

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
    ) -> None:
        self._init_common(
            kv_cache_manager, max_batch_size, max_num_tokens, chunk_unit_size,
            peft_cache, draft_kv_cache_manager, priority_mode,
        )  # fmt: skip
        # Bound methods kept once: the hot loop must not look attributes up per request.
        self._try_alloc = kv_cache_manager.try_allocate_generation
        self._is_active = kv_cache_manager.is_request_active
        self._suspend_kv = kv_cache_manager.suspend_request
        self._can_suspend = kv_cache_manager.can_suspend
        draft = self.draft_kv_cache_manager
        #: The draft cache follows the main one for every scheduled request (``_prepare_draft_resources``).
        self._mirror = None if draft is None else DraftMirror(kv_cache_manager, draft)
        self._peft_release = None if peft_cache is None else peft_cache.release
        self._peft_acquire = None if peft_cache is None else peft_cache.acquire
        self._contexts = ContextPhase(kv_cache_manager, chunk_unit_size, peft_cache)
        self._budget = StepBudget(self._max_tokens, max_batch_size)
        self._stalled_steps = 0

    # -- the pass --------------------------------------------------------------------------------
    def schedule(
        self, active_requests: Sequence[Request], inflight_request_ids: Iterable[int] = frozenset()
    ) -> SchedulerOutput:
        """Generations in order (allocated on the spot, evicting from the tail), then the contexts
        seen before the pass stopped, then the output order; a pass without progress counts a stall."""
        reqs = order_requests(active_requests, True) if self.priority_mode else active_requests
        inflight = as_id_set(inflight_request_ids) if inflight_request_ids else None
        budget = self._start_step(reqs)
        out = SchedulerOutput()
        pending: list[Request] = []
        stop = self._schedule_generations(reqs, inflight, budget, out, pending)
        chunked = (
            self._contexts.run(pending, out.context_requests, budget, lambda r: self._displace(r, out))
            if pending
            else False
        )
        self._track_progress(out, stop)
        if budget.has_lora or chunked:
            out.context_requests = sort_output(
                out.context_requests, out.generation_requests, budget.has_lora, chunked
            )
        out.num_scheduled_tokens = budget.num_tokens
        if self._mirror is not None:
            short = self._mirror.follow_output(out)
            if short:  # the draft pool cannot follow: run these next step rather than half-cached
                self.drop_scheduled(out, short)
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def _start_step(self, reqs: Sequence[Request]) -> StepBudget:
        """A fresh budget; adapters of requests finishing this step stay resident: their pages count."""
        budget = self._budget
        peft = self.peft_cache
        if peft is None:
            budget.reset(0)
            return budget
        budget.reset(peft.max_device_pages)
        for r in reqs:
            if r.lora_id is not None and r.state == GENERATION_TO_COMPLETE:
                budget.claim_resident(r, peft.num_pages(r))
        return budget

    def _schedule_generations(
        self,
        reqs: Sequence[Request],
        inflight: AbstractSet[int] | None,
        budget: StepBudget,
        out: SchedulerOutput,
        pending: list[Request],
    ) -> int:
        """Allocate each generation in list order; defer contexts to ``pending``; stop at the first
        request that does not fit a budget or the KV cache. Returns why it stopped."""
        gen_append = out.generation_requests.append
        pending_append = pending.append
        try_alloc = self._try_alloc
        peft = self.peft_cache
        acquire = self._peft_acquire
        gen_state, ctx_state = GENERATION_IN_PROGRESS, CONTEXT_INIT
        max_tokens, max_reqs = budget.max_tokens, budget.max_reqs
        num_tokens = num_reqs = 0
        stop = _RUN
        end = len(reqs)  # shrinks to the first tail victim: nothing from there on runs this step
        for i, req in enumerate(reqs):
            if i >= end:
                break
            if inflight is not None and req.request_id in inflight:
                continue
            state = req.state
            if state != gen_state:
                if state == ctx_state:
                    pending_append(req)
                continue
            if num_reqs >= max_reqs:
                stop = _BUDGET
                break
            drafts = req.draft_tokens
            cost = 1 + len(drafts) if drafts else 1
            if num_tokens + cost > max_tokens:
                stop = _BUDGET
                break
            lora = req.lora_id
            if lora is not None:
                pages = budget.lora_pages(req, peft)  # checked before, claimed after the allocation
                if pages < 0:
                    stop = _BUDGET
                    break
            if not try_alloc(req):
                ok, end = self._evict_tail(reqs, i, end, req, out, inflight)
                if not ok:
                    self._self_evict(req, out)
                    stop = _KV
                    break
            gen_append(req)
            num_tokens += cost
            num_reqs += 1
            if lora is not None:
                budget.commit_pages(lora, pages)
                if acquire is not None:
                    acquire(req)
        budget.num_tokens = num_tokens
        budget.num_reqs = num_reqs
        return stop

    def _displace(self, req: Request, out: SchedulerOutput) -> None:
        """Take ``req`` off the device: suspend it (KV kept on the host) when the host tier can take
        its blocks, else preempt it for recompute (KV freed, its published prefix stays cached), as
        TensorRT-LLM degrades when suspension cannot happen."""
        mirror = self._mirror
        if self._can_suspend(req) and (mirror is None or mirror.can_suspend(req)):
            self._suspend_kv(req)
            if mirror is not None:
                mirror.suspend(req)
            out.paused_requests.append(req)
        else:
            self.kv_cache_manager.free_request(req)
            if mirror is not None:
                mirror.free(req)
            req.reset_for_recompute()
            out.preempted_requests.append(req)
        if self._peft_release is not None:
            self._peft_release(req)

    def _self_evict(self, req: Request, out: SchedulerOutput) -> None:
        """Nothing after it could make room: displace the failing request itself (if it holds KV)."""
        if self._is_active(req.request_id):
            self._displace(req, out)

    def _evict_tail(
        self,
        reqs: Sequence[Request],
        i: int,
        end: int,
        req: Request,
        out: SchedulerOutput,
        inflight: AbstractSet[int] | None,
    ) -> tuple[bool, int]:
        """Displace started, active requests from the tail (never ``i`` or before) until ``req`` fits.

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
                self._displace(victim, out)
                end = j
                if self._try_alloc(req):
                    return True, end
            j -= 1
        return False, end

    def _track_progress(self, out: SchedulerOutput, stop: int) -> None:
        if out.generation_requests or out.context_requests:
            self._stalled_steps = 0
        else:
            self._check_deadlock(stop, out.paused_requests or out.preempted_requests)

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
