"""What the server needs from an engine, and the adapter over :class:`kvsched.engine.engine.Engine`.

The adapter only uses the Engine's public seam (``add_request``, ``abort_request``, ``step``,
``has_unfinished_requests``, ``pop_output``, ``tokenizer``, ``max_model_len``, ``kv``), so any object
with that seam works — the tests' fake engine included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

from kvsched.core.errors import UnknownRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.outputs import RequestOutput, StepOutput
from kvsched.serve.metrics import EngineSnapshot


class Backend(Protocol):
    max_model_len: int

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...
    def token_text(self, token_id: int) -> str: ...
    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: Hashable,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: int | None = None,
    ) -> None: ...
    # Optional: ``lora_names`` (served adapter names) and ``add_request(..., lora=name)``; a backend
    # without them serves the base model only. ``load_lora_adapter(name, path)`` and
    # ``unload_lora_adapter(name)`` (run on the engine thread) back the runtime adapter routes.
    def abort_request(self, request_id: Hashable) -> RequestOutput | None: ...
    def release(self, request_id: Hashable) -> RequestOutput | None: ...
    def step(self) -> list[StepOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def snapshot(self) -> EngineSnapshot: ...


def gil_free_encoder(tokenizer: Any) -> Callable[[str, bool], list[int]] | None:
    """``(text, add_special_tokens) -> ids`` through the ``tokenizers`` batch encoder, which releases the
    GIL (``Tokenizer.encode`` holds it: a 4 MB prompt froze every other thread, the event loop's too,
    for seconds); ``encode_batch_fast`` also skips the offsets. None if the tokenizer has neither."""
    rust = getattr(tokenizer, "backend", None)
    batch = getattr(rust, "encode_batch_fast", None) or getattr(rust, "encode_batch", None)
    if batch is None:
        return None
    return lambda text, special: list(batch([text], add_special_tokens=special)[0].ids)


class EngineBackend:
    """Engine-thread side of the server over an Engine. Tokenizing is thread-safe: the server runs it
    in worker threads (``serve/prompts.py``), never on the event loop."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.max_model_len: int = engine.max_model_len
        self._tokenizer = engine.tokenizer
        if self._tokenizer is None:
            raise ValueError("the model has no tokenizer; the server needs one to read text prompts")
        self._fast = gil_free_encoder(self._tokenizer)
        #: LoRA adapters the engine loaded, by name (a request's ``model`` field picks one).
        self.lora_names: tuple[str, ...] = tuple(getattr(engine, "lora_names", {}))

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Engine thread only (``AsyncEngine.call``): load an adapter and serve it by name."""
        self.engine.load_lora_adapter(name, path)
        self.lora_names = tuple(self.engine.lora_names)

    def unload_lora_adapter(self, name: str) -> None:
        """Engine thread only: unload an adapter no unfinished request uses."""
        self.engine.unload_lora_adapter(name)
        self.lora_names = tuple(self.engine.lora_names)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast(text, True)  # as Tokenizer.encode: add_special_tokens=True
        return list(self._tokenizer.encode(text))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        render = getattr(self._tokenizer, "apply_chat_template", None)
        if self._fast is not None and render is not None:  # as Tokenizer.encode_chat, GIL released
            text = render([dict(m) for m in messages], add_generation_prompt=True)
            return self._fast(text, False)
        return list(self.engine.parts.apply_chat_template(messages, True))

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: Hashable,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: int | None = None,
        lora: str | None = None,
    ) -> None:
        """``priority``: higher = more important (the engine's convention); ``arrival_time``
        (``time.monotonic``) is when the server received it, the start of its TTFT and latency;
        ``cache_salt``: its prefix-cache scope (``serve/tenancy.py``), None for the shared cache;
        ``lora``: a loaded adapter's name, None for the base model."""
        extra = {} if lora is None else {"lora_id": lora}
        self.engine.add_request(
            token_ids,
            params,
            request_id=request_id,
            priority=priority,
            arrival_time=arrival_time,
            cache_salt=cache_salt,
            **extra,
        )

    def abort_request(self, request_id: Hashable) -> RequestOutput | None:
        """Abort and take the result; a request that already finished is just taken."""
        with contextlib.suppress(UnknownRequestError):
            self.engine.abort_request(request_id)
        return self.release(request_id)

    def release(self, request_id: Hashable) -> RequestOutput | None:
        """Take a finished request's result (its metrics feed /metrics); None if already taken."""
        try:
            return self.engine.pop_output(request_id)
        except UnknownRequestError:
            return None

    def step(self) -> list[StepOutput]:
        return self.engine.step()

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def snapshot(self) -> EngineSnapshot:
        kv = self.engine.kv
        s = kv.stats()
        unfinished = self.engine.num_unfinished_requests
        hits = s.reuse_hit_tokens_device + s.reuse_hit_tokens_host
        return EngineSnapshot(
            num_running=s.num_active_requests,
            num_waiting=max(0, unfinished - s.num_requests),
            num_paused=s.num_requests - s.num_active_requests,
            device_kv_usage=s.used_device_blocks / max(1, s.num_device_blocks),
            host_kv_usage=s.used_host_blocks / max(1, s.num_host_blocks) if s.num_host_blocks else 0.0,
            prefix_queries=hits + s.reuse_miss_tokens,
            prefix_hits=hits,
            num_suspends=s.num_suspends,
            num_resumes=s.num_resumes,
            num_preemptions=getattr(self.engine.stats, "num_preempted", 0),
        )
