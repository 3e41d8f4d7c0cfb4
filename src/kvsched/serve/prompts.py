"""Prompt -> token ids, off the event loop, and the limits a prompt must meet before the engine sees it.

Tokenizing a multi-megabyte prompt takes seconds; done in a handler it froze every client, ``/health``
included. Here it runs in a small pool of worker threads (the backend's encoder releases the GIL, see
``serve/backend.py``), so the loop keeps serving while a large prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvsched.serve.backend import Backend
from kvsched.serve.errors import APIError


def check_prompt_length(num_tokens: int, max_model_len: int, param: str) -> None:
    """A prompt must leave room for one generated token; else a 400 naming the limit."""
    if num_tokens == 0:
        raise APIError(400, "the prompt encodes to zero tokens", param)
    if num_tokens >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, and the prompt is "
            f"{num_tokens} tokens: it must be at most {max_model_len - 1} tokens, so that one can be "
            "generated. Please reduce the length of the prompt.",
            param,
        )


class PromptEncoder:
    """Tokenizes in worker threads and checks the prompt length."""

    def __init__(self, backend: Backend, max_workers: int | None = None) -> None:
        self.backend = backend
        workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvsched-tokenize")

    async def _run(self, fn, arg) -> list[int]:  # noqa: ANN001 - a backend method and its argument
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)

    async def completion(self, prompt: str | Sequence[int]) -> list[int]:
        """A text prompt is tokenized off the loop; token ids are taken as they are."""
        ids = await self._run(self.backend.encode, prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_length(len(ids), self.backend.max_model_len, "prompt")
        return ids

    async def chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = await self._run(self.backend.encode_chat, messages)
        check_prompt_length(len(ids), self.backend.max_model_len, "messages")
        return ids

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
