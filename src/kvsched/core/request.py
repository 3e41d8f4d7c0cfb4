"""The request object that the scheduler, the KV manager, the engine and the simulator share.

Plain writable attributes, as on TensorRT-LLM's ``LlmRequest`` (written the same way in PR #11939's
KVCacheV2Scheduler and KVCacheManagerV2): the scheduler writes ``context_chunk_size``, the KV manager
writes ``context_current_position`` on prefix reuse, the step update appends tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from kvsched.core.errors import InvalidRequestError, UnsupportedFeatureError


class RequestState(IntEnum):
    """Lifecycle states; the integer order matters (the scheduler compares ranges)."""

    CONTEXT_INIT = 10
    GENERATION_IN_PROGRESS = 13
    GENERATION_TO_COMPLETE = 14
    GENERATION_COMPLETE = 20


@dataclass(slots=True)
class SamplingParams:
    """How tokens are chosen and when a request stops; shaped like vLLM's."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if self.n != 1:
            raise UnsupportedFeatureError(f"only n=1 is supported, got n={self.n}")
        if self.use_beam_search or (self.best_of is not None and self.best_of > 1):
            raise UnsupportedFeatureError("beam search (beam width > 1) is not supported")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Request:
    """One sequence being served.

    ``context_current_position`` counts the context tokens already in KV (computed or reused);
    the context is the prompt, or prompt + generated tokens after a recompute preemption.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "max_new_tokens",
        "lora_id",
        "priority",
        "cache_salt",
        "sampling_params",
        "eos_token_ids",
        "arrival_time",
        "state",
        "num_context_tokens",
        "context_current_position",
        "context_chunk_size",
        "num_reused_tokens",
        "draft_tokens",
        "output_token_ids",
        "finish_reason",
        "num_preemptions",
        "num_recomputed_tokens",
        "beam_width",
        "metrics",
    )

    def __init__(
        self,
        request_id: int,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        *,
        lora_id: int | None = None,
        priority: int = 0,
        cache_salt: int | None = None,
        sampling_params: SamplingParams | None = None,
        eos_token_ids: Sequence[int] = (),
        arrival_time: float | None = None,
        beam_width: int = 1,
    ) -> None:
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError(f"request {request_id}: the prompt is empty")
        if max_new_tokens < 1:
            raise InvalidRequestError(
                f"request {request_id}: max_new_tokens must be >= 1, got {max_new_tokens}"
            )
        if beam_width != 1:
            raise UnsupportedFeatureError(
                f"request {request_id}: beam width {beam_width} > 1 is not supported"
            )
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.max_new_tokens = max_new_tokens
        self.lora_id = lora_id
        self.priority = priority
        self.cache_salt = cache_salt
        self.sampling_params = sampling_params
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.beam_width = beam_width
        self.state = RequestState.CONTEXT_INIT
        self.num_context_tokens = len(self.prompt_token_ids)
        self.context_current_position = 0
        self.context_chunk_size = 0
        self.num_reused_tokens = 0
        self.draft_tokens: list[int] = []
        self.output_token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0
        self.metrics: dict[str, float] = {}

    # -- derived views -------------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def context_remaining_length(self) -> int:
        return self.num_context_tokens - self.context_current_position

    @property
    def is_first_context_chunk(self) -> bool:
        return self.context_current_position == self.num_reused_tokens

    @property
    def is_last_context_chunk(self) -> bool:
        return self.context_current_position + self.context_chunk_size >= self.num_context_tokens

    @property
    def is_context_init_state(self) -> bool:
        return self.state == RequestState.CONTEXT_INIT

    @property
    def is_generation_in_progress_state(self) -> bool:
        return self.state == RequestState.GENERATION_IN_PROGRESS

    @property
    def is_generation_to_complete_state(self) -> bool:
        return self.state == RequestState.GENERATION_TO_COMPLETE

    @property
    def is_finished(self) -> bool:
        return self.state == RequestState.GENERATION_COMPLETE

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV exists once the current context/decode step is written."""
        if self.state == RequestState.CONTEXT_INIT:
            return self.context_current_position
        return self.num_tokens - 1

    def token_at(self, position: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < p else self.output_token_ids[position - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def reset_for_recompute(self) -> None:
        """Drop all KV progress: the whole sequence so far becomes the context to prefill again."""
        self.num_recomputed_tokens += self.num_kv_tokens
        self.num_preemptions += 1
        self.state = RequestState.CONTEXT_INIT
        self.num_context_tokens = self.num_tokens
        self.context_current_position = 0
        self.context_chunk_size = 0
        self.num_reused_tokens = 0
        self.draft_tokens = []

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id}, state={self.state.name}, ctx={self.context_current_position}/"
            f"{self.num_context_tokens}, out={len(self.output_token_ids)}/{self.max_new_tokens})"
        )
