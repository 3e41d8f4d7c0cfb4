"""The context phase of the unified pass (KVCacheV2Scheduler's full and chunked context
scheduling, TensorRT-LLM PR #11939).

Separate from the generation loop because it runs over few requests and has two modes: whole
remaining prompt (non-chunked) or FCFS chunks rounded down to ``chunk_unit_size`` (chunked).
"""

from __future__ import annotations

from typing import Any

from kvsched.core.request import Request
from kvsched.core.scheduler.common import check_fits_budget


class ContextPhase:
    """Admits deferred contexts with the budget the generation phase left."""

    __slots__ = ("_prepare", "_resize", "_capacity", "_max_tokens", "_max_reqs", "_unit", "old_capacity")

    def __init__(self, kv: Any, max_tokens: int, max_reqs: int, unit: int | None) -> None:
        self._prepare = kv.prepare_context
        self._resize = kv.resize_context
        self._capacity = kv.capacity
        self._max_tokens = max_tokens
        self._max_reqs = max_reqs
        self._unit = unit
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
        num_tokens: int,
        num_reqs: int,
        claimed: int,
        max_pages: int,
        lora_ids: set[int],
        peft: Any,
        peft_acquire: Any = None,
    ) -> tuple[int, int, int, bool, bool]:
        """Schedule ``pending`` into ``ctx``; return the updated counters, has_lora and chunked."""
        prepare, resize, capacity = self._prepare, self._resize, self._capacity
        max_tokens, max_reqs, unit = self._max_tokens, self._max_reqs, self._unit
        old_capacity = self.old_capacity
        old_capacity.clear()
        has_lora = chunked = False
        for req in pending:
            if num_reqs >= max_reqs:
                break
            lora = req.lora_id
            pages = 0
            if lora is not None:
                has_lora = True
                if peft is not None and lora not in lora_ids:
                    pages = peft.num_pages(req)
                    if claimed + pages > max_pages:
                        continue  # a context short of LoRA pages skips; later ones may share adapters
            if unit is None:
                if not prepare(req):
                    break
                remaining = req.context_remaining_length
                cost = remaining + len(req.draft_tokens)
                if num_tokens + cost > max_tokens:
                    check_fits_budget(req, max_tokens, None)
                    break
                old_capacity[req.request_id] = capacity(req)
                if not resize(req, cost):
                    continue
                req.context_chunk_size = remaining
            else:
                left = max_tokens - num_tokens
                if left < unit:
                    continue
                if not prepare(req):
                    continue
                remaining = req.context_remaining_length
                # left >= unit, so a cut chunk is at least one unit; remaining >= 1 for a context.
                chunk = remaining if remaining <= left else left - left % unit
                cost = chunk + len(req.draft_tokens) if chunk == remaining else chunk
                old_capacity[req.request_id] = capacity(req)
                if not resize(req, cost):
                    continue
                req.context_chunk_size = chunk
                if chunk < remaining:
                    chunked = True
            ctx.append(req)
            num_tokens += cost
            num_reqs += 1
            if lora is not None:
                if pages:
                    claimed += pages
                    lora_ids.add(lora)
                if peft_acquire is not None:
                    peft_acquire(req)
        return num_tokens, num_reqs, claimed, has_lora, chunked
