"""The V1 two-stage baseline: a capacity stage, a micro-batch stage, then KV (TensorRT-LLM's
``SimpleScheduler`` in ``tensorrt_llm/_torch/pyexecutor/scheduler``, which PR #11939's KVCacheV2Scheduler
replaces for KVCacheManagerV2).

Capacity decides which requests fit in KV memory by *estimating* blocks; micro-batch applies the token
budget, batch size and FCFS chunking; only then is KV allocated. Under MAX_UTILIZATION a request that
does not fit preempts started requests from the tail (the current one included); a preempted request
loses its KV (``free_request``) and is reset to prefill again (``reset_for_recompute``).

KV manager members used: ``prepare_context``, ``resize_context``, ``try_allocate_generation``,
``free_request``, ``is_request_active``, ``tokens_per_block``, and read-only ``num_free_device_blocks``
and ``capacity(req)``.
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
    GENERATION_IN_PROGRESS,
    GENERATION_TO_COMPLETE,
    SchedulerBase,
    as_id_set,
    is_started,
    order_requests,
    sort_output,
)
from kvsched.core.scheduler.draft_mirror import DraftMirror, drop_from_output
from kvsched.core.scheduler.micro_batch import allocate, micro_batch
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.scheduler.pages import PageBudget


class TwoStageScheduler(SchedulerBase):
    """Capacity scheduler + micro-batch scheduler, KV allocated afterwards."""

    def __init__(
        self,
        kv_cache_manager: SchedulingKV,
        *,
        policy: CapacityPolicy | str | None = None,  # None: MAX_UTILIZATION
        max_batch_size: int,
        max_num_tokens: int | None = None,
        chunk_unit_size: int | None = None,
        peft_cache: PeftPages | None = None,
        draft_kv_cache_manager: SchedulingKV | None = None,
        priority_mode: bool = False,
    ) -> None:
        self.policy: CapacityPolicy = check_capacity_policy("two-stage", policy)  # type: ignore[assignment]
        # MAX_UTILIZATION sizes and allocates a context's whole prompt at its first chunk, as V1's
        # getNeededBlocksOneStep / addSequence do (TensorRT-LLM kvCacheManager.cpp): a pause then
        # frees a whole prompt, and starting one takes a whole prompt (evicting reusable blocks).
        self._whole_context = self.policy is CapacityPolicy.MAX_UTILIZATION
        self._init_common(
            kv_cache_manager, max_batch_size, max_num_tokens, chunk_unit_size,
            peft_cache, draft_kv_cache_manager, priority_mode,
        )  # fmt: skip
        draft = draft_kv_cache_manager
        self._mirror = None if draft is None else DraftMirror(kv_cache_manager, draft)

    def schedule(
        self, active_requests: Sequence[Request], inflight_request_ids: Iterable[int] = frozenset()
    ) -> SchedulerOutput:
        reqs = order_requests(active_requests, self.priority_mode)
        inflight = as_id_set(inflight_request_ids) or frozenset()
        preempted: list[Request] = []
        if self.policy is CapacityPolicy.MAX_UTILIZATION:
            fitting = self._max_utilization(reqs, inflight, preempted)
        else:
            fitting = self._no_evict(reqs, inflight, self.policy is CapacityPolicy.STATIC_BATCH)
        ctx, gen, _ = micro_batch(fitting, self._max_tokens, self.max_batch_size, self.chunk_unit_size)
        ctx, gen, tokens = allocate(
            self.kv_cache_manager, ctx, gen, preempted, self._preempt, self._whole_context
        )
        has_lora = any(r.lora_id is not None for r in ctx) or any(r.lora_id is not None for r in gen)
        chunked = any(not r.is_last_context_chunk for r in ctx)
        ctx = sort_output(ctx, gen, has_lora, chunked)
        out = SchedulerOutput(ctx, gen, [], preempted, tokens)
        if self._mirror is not None:  # the draft cache follows (TensorRT-LLM's _prepare_draft_resources)
            drop_from_output(self.kv_cache_manager, out, self._mirror.follow_output(out))
        return out

    # -- capacity stage --------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    def _held_blocks(self, req: Request) -> int:
        kv = self.kv_cache_manager
        return self._blocks(kv.capacity(req)) if kv.is_request_active(req.request_id) else 0

    def _blocks_to_completion(self, req: Request) -> int:
        final = req.prompt_len + req.max_new_tokens + len(req.draft_tokens)
        return max(0, self._blocks(final) - self._held_blocks(req))

    def _blocks_one_step(self, req: Request) -> int:
        drafts = len(req.draft_tokens)
        if req.state != CONTEXT_INIT:
            target = req.num_tokens + drafts  # KV holds num_tokens - 1; this step writes 1 + drafts
        elif self._whole_context:  # V1: the whole context at its first chunk
            target = req.num_context_tokens + drafts
        else:
            chunk = min(req.context_remaining_length, self._max_tokens)
            target = req.context_current_position + chunk + drafts
        return max(0, self._blocks(target) - self._held_blocks(req))

    def _no_evict(self, reqs: Sequence[Request], inflight: AbstractSet[int], static: bool) -> list[Request]:
        """GUARANTEED_NO_EVICT / STATIC_BATCH: reserve every admitted request's blocks to completion.

        Generations (in flight or not) reserve first and are admitted without a check; contexts are
        admitted in order while their reservation fits (else stop). STATIC_BATCH admits contexts only
        when no generation runs.
        """
        free = self.kv_cache_manager.num_free_device_blocks
        pages = PageBudget(self.peft_cache)
        limit = self.max_batch_size
        fitting: list[Request] = []
        waiting: list[Request] = []
        for req in reqs:
            state = req.state
            if state in (GENERATION_IN_PROGRESS, GENERATION_TO_COMPLETE):
                free -= self._blocks_to_completion(req)
                if (
                    state == GENERATION_IN_PROGRESS
                    and req.request_id not in inflight
                    and len(fitting) < limit
                ):
                    need = pages.need(req)
                    if need is not None:
                        pages.commit(req, need)
                        fitting.append(req)
            elif state == CONTEXT_INIT and req.request_id not in inflight:
                waiting.append(req)
        if static and fitting:
            return fitting
        for req in waiting:
            if len(fitting) >= limit:
                break
            need = pages.need(req)
            if need is None:
                continue
            blocks = self._blocks_to_completion(req)
            if blocks > free:
                break
            free -= blocks
            pages.commit(req, need)
            fitting.append(req)
        return fitting

    def _max_utilization(
        self, reqs: Sequence[Request], inflight: AbstractSet[int], preempted: list[Request]
    ) -> list[Request]:
        """One pass; each request needs its next-step blocks; preempt started ones from the tail."""
        free = self.kv_cache_manager.num_free_device_blocks
        pages = PageBudget(self.peft_cache)
        fitting: list[Request] = []
        end = len(reqs)
        i = 0
        while i < end and len(fitting) < self.max_batch_size:
            req = reqs[i]
            state = req.state
            if req.request_id in inflight or state not in (CONTEXT_INIT, GENERATION_IN_PROGRESS):
                i += 1
                continue
            need = pages.need(req)
            if need is None:
                i += 1
                continue
            blocks = self._blocks_one_step(req)
            while blocks > free:
                j = end - 1
                while j >= i and not self._evictable(reqs[j], inflight):
                    j -= 1
                if j < i:
                    break
                victim = reqs[j]
                free += self._held_blocks(victim)
                self._preempt(victim, preempted)
                end = j
                if j == i:
                    break
            if i >= end or blocks > free:
                break
            free -= blocks
            pages.commit(req, need)
            fitting.append(req)
            i += 1
        return fitting

    def _evictable(self, req: Request, inflight: AbstractSet[int]) -> bool:
        return (
            is_started(req)
            and req.request_id not in inflight
            and self.kv_cache_manager.is_request_active(req.request_id)
        )

    def _preempt(self, req: Request, preempted: list[Request]) -> None:
        """Free the request's KV and make it prefill again (what TensorRT-LLM's V1 calls a pause:
        terminate + reset; here "paused" always means KV kept)."""
        self.kv_cache_manager.free_request(req)
        if self.draft_kv_cache_manager is not None:
            with contextlib.suppress(UnknownRequestError):
                self.draft_kv_cache_manager.free_request(req)
        req.reset_for_recompute()
        preempted.append(req)
