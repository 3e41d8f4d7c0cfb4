"""The torch-free step update shared by the engine and the simulator.

Once a step's batch ran (:class:`kvsched.core.loop.StepLoop`), :func:`apply_step` moves every scheduled
request forward: contexts advance by their chunk (and turn into generations at the last chunk),
generations append their tokens, KV history advances by what was written, and finished requests
release their KV. Paused (suspended, KV kept) and preempted (KV dropped, to be recomputed) requests are
not touched: the scheduler already did all there is to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from kvsched.core.errors import InvalidRequestError, UnknownRequestError
from kvsched.core.protocols import StepKV
from kvsched.core.request import Request, RequestState
from kvsched.core.scheduler.output import SchedulerOutput

_GEN = RequestState.GENERATION_IN_PROGRESS
_DONE = RequestState.GENERATION_COMPLETE


def finish_request(req: Request, reason: str, kv_cache_manager: StepKV, *, now: float | None = None) -> None:
    """Mark ``req`` finished (``"length"``, ``"stop"``, ``"abort"``...) and release its KV. Idempotent."""
    if req.state == _DONE:
        return
    req.finish_reason = reason
    req.state = _DONE
    if now is not None:
        req.metrics["finished"] = now
    # A request never allocated (e.g. aborted while waiting) has nothing to free.
    with contextlib.suppress(UnknownRequestError):
        kv_cache_manager.free_request(req)


def _sampled_for(req: Request, sampled: Mapping[int, Sequence[int]]) -> Sequence[int]:
    tokens = sampled.get(req.request_id)
    if not tokens:
        raise InvalidRequestError(
            f"request {req.request_id}: the step produced no token for it, but it needs at least one"
        )
    accepted = len(tokens) - 1
    if accepted > len(req.draft_tokens):
        raise InvalidRequestError(
            f"request {req.request_id}: {len(tokens)} tokens sampled but only "
            f"{len(req.draft_tokens)} draft tokens were proposed (at most drafts + 1)"
        )
    return tokens


def _stop_reason(req: Request, token: int) -> str | None:
    """``"stop"`` at EOS (unless ignore_eos) or a stop token, ``"length"`` at max_new_tokens."""
    sp = req.sampling_params
    if token in req.eos_token_ids and (sp is None or not sp.ignore_eos):
        return "stop"
    if sp is not None and sp.stop_token_ids and token in sp.stop_token_ids:
        return "stop"
    if len(req.output_token_ids) >= req.max_new_tokens:
        return "length"
    return None


def token_stop(req: Request, token: int) -> bool:
    """Does ``token`` end ``req`` by itself (EOS unless ignore_eos, a stop token id), whatever its length?"""
    return _stop_reason(req, token) == "stop"


def _append(req: Request, tokens: Sequence[int]) -> tuple[int, str | None]:
    """Append tokens up to the first stop; return how many were appended and the stop reason."""
    out = req.output_token_ids
    for k, token in enumerate(tokens):
        out.append(token)
        reason = _stop_reason(req, token)
        if reason is not None:
            return k + 1, reason
    return len(tokens), None


def apply_step(
    output: SchedulerOutput,
    sampled: Mapping[int, Sequence[int]],
    kv_cache_manager: StepKV,
    *,
    now: float = 0.0,
) -> list[Request]:
    """Apply one executed step; return the requests that finished in it.

    ``sampled[request_id]`` holds the tokens produced for a request: nothing for a non-last context
    chunk, ``1 + accepted drafts`` for a last chunk or a decode. Tokens are appended before the KV
    advances, so a manager with prefix reuse can hash the newly written blocks.
    """
    advance = kv_cache_manager.advance
    finished: list[Request] = []
    for req in output.context_requests:
        chunk = req.context_chunk_size
        pos = req.context_current_position + chunk
        if pos < req.num_context_tokens:
            advance(req, chunk)
            req.context_current_position = pos
            continue
        tokens = _sampled_for(req, sampled)
        n, reason = _append(req, tokens)
        advance(req, chunk + n - 1)
        req.context_current_position = pos
        req.state = _GEN
        metrics = req.metrics
        if "first_token" not in metrics:
            metrics["first_token"] = now
        metrics["last_token"] = now
        if req.draft_tokens:
            req.draft_tokens = []
        if reason is not None:
            finish_request(req, reason, kv_cache_manager, now=now)
            finished.append(req)

    for req in output.generation_requests:
        try:
            (token,) = sampled[req.request_id]  # fast path: exactly one token
        except (KeyError, ValueError, TypeError):
            tokens = _sampled_for(req, sampled)
            n, reason = _append(req, tokens)
            advance(req, n)
            req.metrics["last_token"] = now
            if req.draft_tokens:
                req.draft_tokens = []
        else:
            out = req.output_token_ids
            out.append(token)
            advance(req, 1)
            req.metrics["last_token"] = now
            if req.draft_tokens:
                req.draft_tokens = []  # proposed drafts, none accepted
            if len(out) < req.max_new_tokens and token not in req.eos_token_ids:
                sp = req.sampling_params
                if sp is None or not sp.stop_token_ids or token not in sp.stop_token_ids:
                    continue
            reason = _stop_reason(req, token)
        if reason is not None:
            finish_request(req, reason, kv_cache_manager, now=now)
            finished.append(req)
    return finished
