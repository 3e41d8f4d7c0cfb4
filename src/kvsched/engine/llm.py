"""`LLM`: the offline API, shaped like vLLM's (`generate`, `chat`, results with text and metrics)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from kvsched.core.errors import InvalidRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvsched.engine.request_checks import check_priority

__all__ = ["LLM", "RequestOutput", "CompletionOutput", "RequestMetrics"]

Prompt = str | Mapping[str, Any]
Message = Mapping[str, str]
#: A LoRA adapter by name (``lora_modules`` key) or id; None is the base model.
LoraChoice = str | int | None


class LLM:
    """Loads a model (``None`` = the default SmolLM2-135M GGUF) and generates for batches of prompts.

    Every keyword is an :class:`EngineArgs` field (KV pool sizes, scheduler, batch limits, ...);
    ``priority_mode=True`` makes the scheduler serve higher ``priority`` requests first (see
    :meth:`generate`). ``lora_modules={"name": path}`` loads LoRA adapters in the HF PEFT format;
    ``generate(..., lora_request="name")`` (or one per prompt) picks one.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = Engine(EngineArgs.from_kwargs(model, **engine_args))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] | None = None,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
    ) -> list[RequestOutput]:
        """Serve every prompt together (continuous batching); results in the order of ``prompts``.

        A prompt is a string or ``{"prompt_token_ids": [...]}``. All prompts are checked before any runs,
        so a bad one raises without leaving the others half-served. ``priority`` is one int for all or
        one per prompt; **higher = more important** (the opposite of vLLM, where lower goes first). It
        orders scheduling only when the engine was built with ``priority_mode=True``. ``lora_request``:
        a loaded adapter's name (or id) for every prompt, or a list with one per prompt (None = base).
        """
        if isinstance(prompts, str | Mapping):
            prompts = [prompts]
        inputs = [self._prompt_input(p, i) for i, p in enumerate(prompts)]
        params = self._params_per_prompt(sampling_params, len(inputs))
        priorities = self._priority_per_prompt(priority, len(inputs))
        loras = self._lora_per_prompt(lora_request, len(inputs))
        added: list[Any] = []
        try:
            for prompt, sp, prio, lora in zip(inputs, params, priorities, loras):
                added.append(self.engine.add_request(prompt, sp, priority=prio, lora_id=lora))
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
                self.engine.pop_output(rid)
            raise
        return self._run(added, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        priority: int | Sequence[int] | None = None,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate
        (``priority`` as in :meth:`generate`)."""
        if not messages:
            raise InvalidRequestError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], Mapping) else messages
        prompts = [
            {"prompt_token_ids": self.encode_chat(conv, add_generation_prompt)} for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, priority=priority, lora_request=lora_request)

    def encode_chat(self, conversation: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        if not conversation:
            raise InvalidRequestError("a conversation needs at least one message")
        return list(self.engine.parts.apply_chat_template(conversation, add_generation_prompt))

    # -- helpers ---------------------------------------------------------------------------------
    def _run(self, request_ids: list[Any], use_tqdm: bool) -> list[RequestOutput]:
        bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req", disable=not use_tqdm)
        wanted = set(request_ids)
        results: dict[Any, RequestOutput] = {}
        try:
            while len(results) < len(wanted) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = self.engine.pop_output(out.request_id)
                        bar.update(1)
        finally:
            bar.close()
        return [results[rid] for rid in request_ids]

    @staticmethod
    def _prompt_input(prompt: Prompt, index: int) -> str | list[int]:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, Mapping) and "prompt" in prompt:
            return str(prompt["prompt"])
        raise InvalidRequestError(
            f"prompt {index}: expected a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
        )

    @staticmethod
    def _lora_per_prompt(lora: LoraChoice | Sequence[LoraChoice], n: int) -> list[LoraChoice]:
        if lora is None or isinstance(lora, str | int):
            return [lora] * n
        if not isinstance(lora, Sequence):
            raise InvalidRequestError(f"lora_request={lora!r} is invalid: a name, an id or a list of them")
        if len(lora) != n:
            raise InvalidRequestError(f"{len(lora)} lora_request entries for {n} prompts")
        return list(lora)

    @staticmethod
    def _priority_per_prompt(priority: int | Sequence[int] | None, n: int) -> list[int]:
        if priority is None:
            return [0] * n
        if isinstance(priority, numbers.Integral):
            return [check_priority(priority)] * n
        if isinstance(priority, str | bytes) or not isinstance(priority, Sequence):
            raise InvalidRequestError(f"priority={priority!r} is invalid: an int or a list of ints")
        if len(priority) != n:
            raise InvalidRequestError(f"{len(priority)} priorities for {n} prompts")
        return [check_priority(p) for p in priority]

    @staticmethod
    def _params_per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise InvalidRequestError(f"{len(params)} sampling params for {n} prompts")
        return list(params)
