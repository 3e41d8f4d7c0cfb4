"""The engine's book of requests: their engine-side state, and how their tokens become outputs.

Split out of engine.py so that the synchronous loop, speculative steps (engine/spec_step.py) and async
scheduling (engine/overlap.py) emit, fail and retire a request through one owner: text deltas and stop
strings (the text stream), logprobs, per-request metrics, and the ``RequestOutput`` kept until
``Engine.pop_output``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from kvsched.core.peft import PeftCache
from kvsched.core.protocols import StepKV
from kvsched.core.request import Request, SamplingParams
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.step import finish_request
from kvsched.engine.logprobs import RowLogprobs
from kvsched.engine.metrics import EngineStats
from kvsched.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepOutput
from kvsched.engine.text_stream import TextStream

__all__ = ["RequestBook", "Tracked"]


@dataclass(slots=True)
class Tracked:
    """Engine-side state of one request (the Request itself is shared with scheduler and KV)."""

    req: Request
    external_id: Hashable
    prompt: str | None
    params: SamplingParams
    metrics: RequestMetrics
    stream: TextStream
    generator: torch.Generator | None
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    suspended: bool = False


class RequestBook:
    """Unfinished requests by internal id, their external ids, and the finished results."""

    __slots__ = ("tracked", "by_external", "finished", "step_kv", "stats", "peft_cache")

    def __init__(self, step_kv: StepKV, stats: EngineStats, peft_cache: PeftCache | None) -> None:
        #: internal id -> engine-side state, while unfinished.
        self.tracked: dict[int, Tracked] = {}
        #: external id -> internal id, while unfinished.
        self.by_external: dict[Hashable, int] = {}
        #: external id -> result, until popped.
        self.finished: dict[Hashable, RequestOutput] = {}
        #: What finishing frees (with a draft cache, both caches).
        self.step_kv = step_kv
        self.stats = stats
        self.peft_cache = peft_cache

    def params_of(self, req: Request) -> tuple[SamplingParams, torch.Generator | None]:
        """A request's sampling parameters and seeded generator (the speculator samples with them)."""
        t = self.tracked[req.request_id]
        return t.params, t.generator

    def note_schedule(self, out: SchedulerOutput, now: float) -> None:
        """Suspend / resume / preemption counts and the first scheduled time of a step's requests."""
        tracked = self.tracked
        for req in out.paused_requests:
            t = tracked[req.request_id]
            t.metrics.num_suspends += 1
            t.suspended = True
        for req in out.preempted_requests:
            tracked[req.request_id].metrics.num_preemptions += 1
        for req in itertools.chain(out.context_requests, out.generation_requests):
            m = tracked[req.request_id]
            if m.suspended:
                m.suspended = False
                m.metrics.num_resumes += 1
            if m.metrics.first_scheduled_time is None:
                m.metrics.first_scheduled_time = now
            if req.num_reused_tokens > m.metrics.num_reused_tokens:
                m.metrics.num_reused_tokens = req.num_reused_tokens

    def emit(
        self,
        tracked: Tracked,
        token: int,
        logprob: float | None,
        now: float,
        top: dict[int, float] | None = None,
    ) -> StepOutput:
        """One new token of a request: its text delta; a stop string ends it here."""
        req = tracked.req
        if tracked.logprobs is not None and logprob is not None:
            tracked.logprobs.append(logprob)
        if tracked.top_logprobs is not None and top is not None:
            tracked.top_logprobs.append(top)
        try:
            delta, stopped = tracked.stream.push([token], final=req.is_finished)
        except Exception as exc:
            return self._detokenize_failed(tracked, exc)
        if stopped:  # a stop string: the text stream is its one owner
            if req.is_finished:
                req.finish_reason = "stop"  # it ends the text, so it names the reason (as in vLLM)
            else:
                finish_request(req, "stop", self.step_kv, now=now)
        if req.is_finished:
            self.retire(tracked)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=[token],
            text_delta=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            logprobs=None if logprob is None else [logprob],
            top_logprobs=None if top is None or tracked.top_logprobs is None else [top],
        )

    def emit_many(
        self, tracked: Tracked, before: int, tokens: list[int], lps: RowLogprobs | None, now: float
    ) -> StepOutput:
        """Emit several tokens of one step, token by token through the text stream: a stop string
        inside them ends the output there (the tokens after it are dropped, as without speculation)."""
        req = tracked.req
        delta_all, emitted = "", 0
        for j, tok in enumerate(tokens):
            last = j == len(tokens) - 1
            emitted += 1
            try:
                delta, stopped = tracked.stream.push([tok], final=req.is_finished and last)
            except Exception as exc:
                return self._detokenize_failed(tracked, exc)
            delta_all += delta
            if stopped:
                if not req.is_finished:
                    finish_request(req, "stop", self.step_kv, now=now)
                req.finish_reason = "stop"
                del req.output_token_ids[before + emitted :]
                break
        kept = tokens[:emitted]
        sampled = top = None
        if lps is not None:
            sampled, top = lps.sampled[:emitted], lps.top[:emitted]
            if tracked.logprobs is not None:
                tracked.logprobs.extend(sampled)
            if tracked.top_logprobs is not None:
                tracked.top_logprobs.extend(top)
        if req.is_finished:
            self.retire(tracked)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=kept,
            text_delta=delta_all,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            logprobs=sampled,
            top_logprobs=top,
        )

    def _detokenize_failed(self, tracked: Tracked, exc: Exception) -> StepOutput:
        """A detokenizer fault fails this request alone (``emit`` and ``emit_many`` alike)."""
        return self.fail(
            tracked,
            f"the engine failed this request: detokenizing its output raised {type(exc).__name__}: {exc}",
        )

    def fail(self, tracked: Tracked, message: str) -> StepOutput:
        """End one request with finish_reason "error" and free its KV; ``message`` says why."""
        req = tracked.req
        if req.is_finished:  # finished by the step update before the fault: its KV is already freed
            req.finish_reason = "error"
        else:
            finish_request(req, "error", self.step_kv, now=time.monotonic())
        self.retire(tracked, error=message)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=[],
            text_delta="",
            finished=True,
            finish_reason="error",
            error=message,
        )

    def retire(self, tracked: Tracked, error: str | None = None) -> None:
        """A finished request leaves the book; its ``RequestOutput`` waits for ``pop_output``."""
        req = tracked.req
        if self.peft_cache is not None:
            self.peft_cache.release(req)  # a finished request no longer pins its adapter
        m = tracked.metrics
        m.read_times(req)  # first/last token and finish: recorded once, by apply_step / finish_request
        m.num_preemptions = max(m.num_preemptions, req.num_preemptions)
        m.num_recomputed_tokens = req.num_recomputed_tokens
        self.stats.record_finish(req)
        del self.tracked[req.request_id]
        del self.by_external[tracked.external_id]
        self.finished[tracked.external_id] = RequestOutput(
            request_id=tracked.external_id,
            prompt=tracked.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=tracked.stream.text,
                    token_ids=list(req.output_token_ids),
                    finish_reason=req.finish_reason,
                    logprobs=tracked.logprobs,
                    top_logprobs=tracked.top_logprobs,
                )
            ],
            finished=True,
            metrics=m,
            num_cached_tokens=m.num_reused_tokens,
            error=error,
        )
