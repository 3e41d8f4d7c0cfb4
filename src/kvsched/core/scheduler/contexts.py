"""The context phase of the unified pass (KVCacheV2Scheduler's full and chunked context
scheduling, TensorRT-LLM PR #11939).

Separate from the generation loop because it runs over few requests and has two modes: whole
remaining prompt (non-chunked) or FCFS chunks rounded down to ``chunk_unit_size`` (chunked).

A started context (one that already holds KV) that cannot resume or grow suspends started contexts
behind it, from the tail, as a generation does: two half-computed prompts that fill the device
between them must not wait for each other forever.
"""

from __future__ import annotations

from collections.abc import Callable

from kvsched.core.protocols import PeftPages, SchedulingKV
from kvsched.core.request import Request
from kvsched.core.scheduler.budget import StepBudget
from kvsched.core.scheduler.common import check_fits_budget, is_started

_SKIP, _STOP = -1, -2  # not admitted: try the next context / end the phase


class ContextPhase:
    """Admits the contexts the generation phase deferred, with the budget it left."""

    __slots__ = (
        "_prepare",
        "_resize",
        "_capacity",
        "_is_active",
        "_unit",
        "_peft",
        "_acquire",
        "_kv_short",
        "old_capacity",
    )

    def __init__(self, kv: SchedulingKV, unit: int | None, peft: PeftPages | None = None) -> None:
        self._prepare = kv.prepare_context
        self._resize = kv.resize_context
        self._capacity = kv.capacity
        self._is_active = kv.is_request_active
        self._unit = unit
        self._peft = peft
        self._acquire = None if peft is None else peft.acquire
        #: The last refusal was the KV cache's (not the token budget's): evicting may help.
        self._kv_short = False
        #: request id -> KV capacity before this step's resize (for ``drop_scheduled``).
        self.old_capacity: dict[int, int] = {}

    @staticmethod
    def cost_of(req: Request) -> int:
        """Tokens a scheduled context costs: its chunk, plus the drafts riding on a last chunk."""
        drafts = len(req.draft_tokens) if req.is_last_context_chunk else 0
        return req.context_chunk_size + drafts

    def run(
        self,
        pending: list[Request],
        ctx: list[Request],
        budget: StepBudget,
        displace: Callable[[Request], None],
    ) -> bool:
        """Schedule ``pending`` into ``ctx`` and spend ``budget``; True if a context was cut short.

        ``displace`` takes a started context off the device for a request ahead of it (and reports it
        in the output); a victim is not looked at again this step.
        """
        self.old_capacity.clear()
        admit = self._admit_whole if self._unit is None else self._admit_chunk
        chunked = False
        end = len(pending)
        for k in range(end):
            if k >= end or budget.num_reqs >= budget.max_reqs:
                break
            req = pending[k]
            lora = req.lora_id
            if lora is not None:
                pages = budget.lora_pages(req, self._peft)
                if pages < 0:
                    continue  # short of LoRA pages: later contexts may share resident adapters
            cost = admit(req, budget)
            if cost < 0 and self._kv_short and is_started(req):
                cost, end = self._evict_behind(pending, k, end, req, cost, budget, displace)
            if cost < 0:
                if cost == _STOP:
                    break
                continue
            if req.context_chunk_size < req.context_remaining_length:
                chunked = True
            ctx.append(req)
            budget.num_tokens += cost
            budget.num_reqs += 1
            if lora is not None:
                budget.commit_pages(lora, pages)
                if self._acquire is not None:
                    self._acquire(req)
        return chunked

    def _evict_behind(
        self,
        pending: list[Request],
        k: int,
        end: int,
        req: Request,
        cost: int,
        budget: StepBudget,
        displace: Callable[[Request], None],
    ) -> tuple[int, int]:
        """Displace started, active contexts after ``k`` from the tail until ``req`` is admitted.

        ``cost`` is the refusal so far. Returns the admission's cost (negative if it still failed) and
        the new end of ``pending``.
        """
        admit = self._admit_whole if self._unit is None else self._admit_chunk
        j = end - 1
        while j > k:
            victim = pending[j]
            if is_started(victim) and self._is_active(victim.request_id):
                displace(victim)
                end = j
                cost = admit(req, budget)
                if cost >= 0 or not self._kv_short:
                    return cost, end
            j -= 1
        return cost, end

    def _admit_whole(self, req: Request, budget: StepBudget) -> int:
        """The whole remainder in one step: its cost, ``_SKIP`` or ``_STOP``."""
        self._kv_short = True
        if not self._prepare(req):
            return _STOP
        remaining = req.context_remaining_length
        cost = remaining + len(req.draft_tokens)
        if budget.num_tokens + cost > budget.max_tokens:
            self._kv_short = False
            check_fits_budget(req, budget.max_tokens, None)
            return _STOP
        self.old_capacity[req.request_id] = self._capacity(req)
        if not self._resize(req, cost):
            return _SKIP
        req.context_chunk_size = remaining
        return cost

    def _admit_chunk(self, req: Request, budget: StepBudget) -> int:
        """A chunk of what the budget has left, rounded down to the unit: its cost, or ``_SKIP``."""
        unit: int = self._unit  # type: ignore[assignment]
        left = budget.max_tokens - budget.num_tokens
        if left < unit:
            self._kv_short = False
            return _SKIP
        self._kv_short = True
        if not self._prepare(req):
            return _SKIP
        remaining = req.context_remaining_length
        # left >= unit, so a cut chunk is at least one unit; remaining >= 1 for a context.
        chunk = remaining if remaining <= left else left - left % unit
        cost = chunk + len(req.draft_tokens) if chunk == remaining else chunk
        self.old_capacity[req.request_id] = self._capacity(req)
        if not self._resize(req, cost):
            return _SKIP
        req.context_chunk_size = chunk
        return cost
