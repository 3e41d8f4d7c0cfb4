"""Helpers shared by the three schedulers: budget validation, ordering, the "started" predicate."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from kvsched.core.config import check_budgets
from kvsched.core.errors import InvalidRequestError
from kvsched.core.protocols import PeftPages, SchedulingKV, require
from kvsched.core.request import Request, RequestState

#: Stand-in for "no token budget": every comparison against it succeeds without a None check.
UNLIMITED = sys.maxsize

CONTEXT_INIT = RequestState.CONTEXT_INIT
GENERATION_IN_PROGRESS = RequestState.GENERATION_IN_PROGRESS
GENERATION_TO_COMPLETE = RequestState.GENERATION_TO_COMPLETE
GENERATION_COMPLETE = RequestState.GENERATION_COMPLETE


def token_budget(max_batch_size: int, max_num_tokens: int | None, chunk_unit_size: int | None) -> int:
    """Validate the per-step budgets (:func:`kvsched.core.config.check_budgets`, the one rule); return
    the token budget with None mapped to ``UNLIMITED``."""
    check_budgets(max_batch_size, max_num_tokens, chunk_unit_size)
    return UNLIMITED if max_num_tokens is None else max_num_tokens


def check_fits_budget(req: Request, max_tokens: int, unit: int | None) -> None:
    """Without chunking a context runs whole: one larger than the whole token budget never could.

    With a recomputing scheduler this also catches a preempted request whose prompt + outputs
    outgrew the budget; without chunking, ``max_num_tokens`` must cover prompt + max_new_tokens.
    """
    remaining = req.context_remaining_length
    if unit is None and 0 < max_tokens < remaining:
        what = "prompt + outputs (recompute after preemption)" if req.num_preemptions else "prompt"
        raise InvalidRequestError(
            f"request {req.request_id}: its {what} needs {remaining} tokens in one step but "
            f"max_num_tokens is {max_tokens}; set chunk_unit_size to enable chunked prefill or raise "
            "max_num_tokens"
        )


def as_id_set(ids: Iterable[int]) -> AbstractSet[int] | None:
    """In-flight ids as a set (None when empty) so membership stays O(1) whatever the caller passed."""
    if not ids:
        return None
    return ids if isinstance(ids, (set, frozenset)) else frozenset(ids)


def is_started(req: Request) -> bool:
    """A request that already computed something: a decode, or a context past its first chunk."""
    state = req.state
    if state == GENERATION_IN_PROGRESS:
        return True
    return state == CONTEXT_INIT and not req.is_first_context_chunk


def lora_key(req: Request) -> tuple[int, int]:
    """Requests without LoRA first, then ascending adapter id (C++ ``std::optional`` order)."""
    lora = req.lora_id
    return (0, 0) if lora is None else (1, lora)


def priority_key(req: Request) -> tuple[int, float]:
    """Priority mode order: higher ``priority`` first, then earlier arrival."""
    return (-req.priority, req.arrival_time)


def order_requests(requests: Sequence[Request], priority_mode: bool) -> Sequence[Request]:
    """The list a pass walks: as given (arrival order), or stably sorted by priority."""
    if priority_mode:
        return sorted(requests, key=priority_key)
    return requests


def sort_output(
    context_requests: list[Request], generation_requests: list[Request], has_lora: bool, chunked: bool
) -> list[Request]:
    """LoRA-aware order (in place for generations); returns the context list to emit.

    When a context was chunked, non-last chunks come before last chunks, each group in LoRA order.
    """
    if has_lora:
        generation_requests.sort(key=lora_key)
    if chunked:
        first = [r for r in context_requests if not r.is_last_context_chunk]
        last = [r for r in context_requests if r.is_last_context_chunk]
        if has_lora:
            first.sort(key=lora_key)
            last.sort(key=lora_key)
        return first + last
    if has_lora:
        context_requests.sort(key=lora_key)
    return context_requests


class SchedulerBase:
    """What every scheduler keeps from the shared constructor keywords (same as UnifiedScheduler's)."""

    def _init_common(
        self,
        kv_cache_manager: SchedulingKV,
        max_batch_size: int,
        max_num_tokens: int | None,
        chunk_unit_size: int | None,
        peft_cache: PeftPages | None,
        draft_kv_cache_manager: SchedulingKV | None,
        priority_mode: bool,
    ) -> None:
        require("kv_cache_manager", kv_cache_manager, SchedulingKV)
        if draft_kv_cache_manager is not None:
            require("draft_kv_cache_manager", draft_kv_cache_manager, SchedulingKV)
        if peft_cache is not None:
            require("peft_cache", peft_cache, PeftPages)
        self._max_tokens = token_budget(max_batch_size, max_num_tokens, chunk_unit_size)
        self.kv_cache_manager = kv_cache_manager
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.chunk_unit_size = chunk_unit_size
        self.peft_cache = peft_cache
        self.draft_kv_cache_manager = draft_kv_cache_manager
        self.priority_mode = priority_mode
        self.tokens_per_block: int = kv_cache_manager.tokens_per_block
