"""Request intake: a prompt and its parameters checked, tokenized and entered in the engine's book.

Split out of engine.py (``Engine.add_request`` is its one caller). Every check runs before any shared
state changes, so a request with bad input fails alone with a typed error (InvalidRequestError,
RequestTooLargeError, DuplicateRequestError, UnsupportedFeatureError) while the others keep running.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence

from kvsched.core.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    KVSchedError,
    UnsupportedFeatureError,
)
from kvsched.core.request import Request, SamplingParams
from kvsched.engine.logprobs import check_num_logprobs
from kvsched.engine.outputs import RequestMetrics
from kvsched.engine.parts import EngineParts
from kvsched.engine.request_book import RequestBook, Tracked
from kvsched.engine.request_checks import check_cache_salt, check_priority, check_prompt
from kvsched.engine.sampler import Sampler
from kvsched.engine.text_stream import TextStream

__all__ = ["Intake"]


class Intake:
    """Builds and registers the engine-side state of each new request (ids unique while unpopped)."""

    __slots__ = ("parts", "book", "_ids")

    def __init__(self, parts: EngineParts, book: RequestBook) -> None:
        self.parts = parts
        self.book = book
        self._ids = itertools.count()

    def admit(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None,
        request_id: Hashable | None,
        lora_id: int | str | None,
        arrival_time: float | None,
        priority: int,
        cache_salt: int | None,
    ) -> Tracked:
        """Check and tokenize one request, enter it in the book, and return its state."""
        params = sampling_params or SamplingParams()
        params.validate()
        check_num_logprobs(params.logprobs)
        priority = check_priority(priority)
        check_cache_salt(cache_salt)
        lora = self._resolve_lora(lora_id)
        internal = next(self._ids)
        external = internal if request_id is None else request_id
        by_external, finished = self.book.by_external, self.book.finished
        while request_id is None and (external in by_external or external in finished):
            external = internal = next(self._ids)  # a caller-chosen id took this number
        if external in by_external or external in finished:
            raise DuplicateRequestError(f"request id {external!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._encode(external, prompt) if isinstance(prompt, str) else list(prompt)
        parts = self.parts
        check_prompt(
            token_ids,
            params.max_tokens,
            vocab_size=parts.vocab_size,
            max_model_len=parts.max_model_len,
            tokens_per_block=parts.kv.tokens_per_block,
            num_device_blocks=parts.kv.num_device_blocks,
            request_id=external,
        )
        req = Request(
            internal,
            token_ids,
            params.max_tokens,
            lora_id=lora,
            sampling_params=params,
            eos_token_ids=() if params.ignore_eos else parts.eos_token_ids,
            arrival_time=arrival_time,
            priority=priority,
            cache_salt=cache_salt,
        )
        gen = None if params.seed is None else Sampler.make_generator(params.seed, parts.device)
        tracked = Tracked(
            req=req,
            external_id=external,
            prompt=text,
            params=params,
            metrics=RequestMetrics(arrival_time=req.arrival_time),
            stream=TextStream(parts.tokenizer, token_ids, params.stop),
            generator=gen,
            logprobs=[] if params.logprobs is not None else None,
            top_logprobs=[] if params.logprobs is not None else None,
        )
        self.book.tracked[internal] = tracked
        by_external[external] = internal
        return tracked

    def _resolve_lora(self, lora: int | str | None) -> int | None:
        """A request's adapter (id or name) -> its id, checked against the loaded adapters and the budget."""
        if lora is None:
            return None
        registry, peft = self.parts.lora, self.parts.peft_cache
        if registry is None or peft is None:
            raise UnsupportedFeatureError(f"lora_id={lora!r}: this engine has no LoRA adapters loaded")
        lora_id = registry.resolve(lora)
        assert lora_id is not None
        registry.check_fits(lora_id, peft.max_device_pages)
        return lora_id

    def _encode(self, rid: Hashable, prompt: str) -> list[int]:
        """Tokenize a text prompt; a tokenizer that raises is this request's InvalidRequestError."""
        try:
            return self.parts.encode(prompt)
        except KVSchedError:
            raise
        except Exception as exc:
            raise InvalidRequestError(
                f"request {rid!r}: the tokenizer failed on the prompt: {type(exc).__name__}: {exc}"
            ) from exc
