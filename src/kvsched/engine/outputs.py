"""What the engine hands back: per-step deltas (for streaming) and finished results (vLLM-shaped)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from kvsched.core.request import Request


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.monotonic``) and scheduling counters of one request.

    The times are read, never recorded, here: arrival is ``Request.arrival_time``, and the first
    token, last token and finish are written once by ``core.step.apply_step`` / ``finish_request``
    into ``Request.metrics`` (see :meth:`read_times`). ``LLM``, ``kvsched bench offline`` and the
    server's Prometheus metrics all read this object.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0
    num_suspends: int = 0
    num_resumes: int = 0
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    num_reused_tokens: int = 0
    # Speculative decoding: decode steps that verified drafts, drafts proposed, drafts the target kept.
    num_speculative_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of proposed draft tokens the target accepted (None without speculation)."""
        n = self.num_draft_tokens
        return None if n == 0 else self.num_accepted_draft_tokens / n

    @property
    def mean_accepted_tokens_per_step(self) -> float | None:
        """Draft tokens accepted per speculative decode step (each step also adds the target's own
        token, so it produced ``1 +`` this many); None without speculation."""
        n = self.num_speculative_steps
        return None if n == 0 else self.num_accepted_draft_tokens / n

    def read_times(self, req: Request) -> None:
        """Take the request's times and output length from the core's one record of them."""
        times = req.metrics
        self.arrival_time = req.arrival_time
        self.first_token_time = times.get("first_token")
        self.last_token_time = times.get("last_token")
        self.finished_time = times.get("finished")
        self.num_generation_tokens = len(req.output_token_ids)

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        n = self.num_generation_tokens
        if n < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (n - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request: the delta a streaming client sends on."""

    request_id: Hashable
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    #: Per new token, the ``SamplingParams.logprobs`` most likely tokens ``{token_id: logprob}``, most
    #: likely first (the raw distribution's, as ``logprobs``); None when logprobs were not asked for.
    top_logprobs: list[dict[int, float]] | None = None
    #: With finish_reason "error": why the engine failed this request (the others kept running).
    error: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence (``n=1`` only, so always index 0)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per token, as StepOutput.top_logprobs

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(self.logprobs)


@dataclass(slots=True)
class RequestOutput:
    """A finished request as `LLM.generate` returns it; shaped like vLLM's ``RequestOutput``."""

    request_id: Hashable
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    #: With finish_reason "error": why the engine failed this request (the others kept running).
    error: str | None = None
