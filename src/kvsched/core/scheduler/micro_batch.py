"""Second stage and KV step of the two-stage baseline: token budget, batch size, FCFS chunks."""

from __future__ import annotations

from collections.abc import Callable

from kvsched.core.protocols import SchedulingKV
from kvsched.core.request import Request
from kvsched.core.scheduler.common import CONTEXT_INIT, check_fits_budget


def micro_batch(
    fitting: list[Request], max_tokens: int, max_reqs: int, unit: int | None
) -> tuple[list[Request], list[Request], int]:
    """Apply the token budget and batch size to the capacity winners, in their order.

    Generations cost ``1 + drafts``; whole contexts cost their remainder plus drafts (over budget:
    stop). With chunking, contexts are collected and then share what is left FCFS, non-last chunks
    rounded down to ``unit``; a context left with a zero chunk is dropped. Writes
    ``context_chunk_size``. Returns (contexts, generations, tokens of generations and whole contexts).
    """
    ctx: list[Request] = []
    gen: list[Request] = []
    chunked: list[Request] = []
    tokens = 0
    for req in fitting:
        if len(ctx) + len(gen) + len(chunked) >= max_reqs:
            break
        drafts = len(req.draft_tokens)
        if req.state == CONTEXT_INIT:
            if unit is not None:
                chunked.append(req)
                continue
            remaining = req.context_remaining_length
            cost = remaining + drafts
            if tokens + cost > max_tokens:
                check_fits_budget(req, max_tokens, None)
                break
            req.context_chunk_size = remaining
            ctx.append(req)
        else:
            cost = 1 + drafts
            if tokens + cost > max_tokens:
                break
            gen.append(req)
        tokens += cost
    left = max_tokens - tokens
    for req in chunked:
        remaining = req.context_remaining_length
        chunk = remaining if remaining <= left else left - left % unit  # type: ignore[operator]
        if chunk <= 0:
            continue
        req.context_chunk_size = chunk
        left -= chunk
        ctx.append(req)
    return ctx, gen, tokens


def allocate(
    kv: SchedulingKV,
    ctx: list[Request],
    gen: list[Request],
    preempted: list[Request],
    preempt: Callable[[Request, list[Request]], None],
    whole_context: bool = False,
) -> tuple[list[Request], list[Request], int]:
    """Allocate KV for the micro-batch (after both stages, as V1 does in ``prepare_resources``).

    The capacity stage only estimated blocks, so an allocation can still fail: a generation that
    cannot grow is preempted (recompute later), a context that cannot grow is left for a later step.
    Prefix reuse found by ``prepare_context`` shrinks a context's chunk to what is really left.
    ``whole_context``: a first chunk takes blocks for the whole context at once, as TensorRT-LLM's V1
    ``addSequence`` does (later chunks then allocate nothing).
    """
    out_gen: list[Request] = []
    out_ctx: list[Request] = []
    tokens = 0
    for req in gen:
        if kv.try_allocate_generation(req):
            out_gen.append(req)
            tokens += 1 + len(req.draft_tokens)
        else:
            preempt(req, preempted)
    for req in ctx:
        if not kv.prepare_context(req):
            continue
        remaining = req.context_remaining_length
        chunk = min(req.context_chunk_size, remaining)
        req.context_chunk_size = chunk
        cost = chunk + len(req.draft_tokens) if chunk == remaining else chunk
        grow = remaining + len(req.draft_tokens) if whole_context and req.is_first_context_chunk else cost
        if kv.resize_context(req, grow):
            out_ctx.append(req)
            tokens += cost
    return out_ctx, out_gen, tokens
