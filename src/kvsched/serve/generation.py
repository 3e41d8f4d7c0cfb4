"""Request -> engine input, and engine output -> OpenAI bodies, shared by both endpoints.

Completions and chat differ only in how a delta is wrapped (``text`` vs ``delta.content``) and how
logprobs are shaped; :class:`Formatter` holds those differences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kvsched.core.request import SamplingParams
from kvsched.engine.outputs import StepOutput
from kvsched.serve.async_engine import RequestHandle
from kvsched.serve.errors import APIError, sse_error
from kvsched.serve.protocol import (
    ChatChoiceLogprobs,
    ChatLogprob,
    CompletionLogprobs,
    UsageInfo,
    _SamplingFields,
)


def check_context(num_prompt: int, max_tokens: int | None, max_model_len: int, cap: int | None = None) -> int:
    """The max_tokens to use, as vLLM chooses it: a request whose prompt + max_tokens exceeds the context
    is a 400 that names the numbers; without max_tokens, the rest of the context; then at most ``cap``
    (``--max-tokens-cap``), which clamps rather than refuses, as vLLM's server-side ``max_new_tokens``."""
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len or max_tokens < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages/prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            "max_tokens" if num_prompt < max_model_len else "prompt",
        )
    return max_tokens if cap is None else min(max_tokens, cap)


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=req.stop_list or None,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


@dataclass(slots=True)
class Collected:
    """A finished request, gathered from its deltas (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


def hold_logprobs(held: Collected, delta: StepOutput) -> None:
    """Add a delta's tokens and logprobs to ``held`` (a stream sends them with its next chunk)."""
    held.token_ids.extend(delta.new_token_ids)
    held.logprobs.extend(delta.logprobs or [])
    held.top_logprobs.extend(delta.top_logprobs or [])


async def collect(handle: RequestHandle, is_disconnected: Callable, poll_s: float = 0.5) -> Collected:
    """Gather every delta; abort (via the handle) if the client goes away meanwhile.

    The client is polled at most every ``poll_s`` seconds, whether deltas are flowing or not.
    """
    out = Collected()
    parts: list[str] = []
    iterator = handle.__aiter__()
    next_poll = time.monotonic() + poll_s
    try:
        while True:
            nxt = asyncio.ensure_future(iterator.__anext__())
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=max(0.0, next_poll - time.monotonic()))
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + poll_s
                    if await is_disconnected():
                        nxt.cancel()
                        raise APIError(499, "client disconnected")
                if done:
                    break
            try:
                delta: StepOutput = nxt.result()
            except StopAsyncIteration:
                break
            parts.append(delta.text_delta)
            out.token_ids.extend(delta.new_token_ids)
            if delta.logprobs:
                out.logprobs.extend(delta.logprobs)
            if delta.top_logprobs:
                out.top_logprobs.extend(delta.top_logprobs)
            if delta.finished:
                out.finish_reason = delta.finish_reason
                break
    finally:
        handle.close()
    out.text = "".join(parts)
    return out


def usage(handle: RequestHandle) -> UsageInfo:
    n_in, n_out = handle.num_prompt_tokens, handle.num_output_tokens
    return UsageInfo(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)


def _finite(lp: float) -> float:
    """JSON has no -inf: a token the model rules out is reported as -9999.0, as vLLM does."""
    return max(lp, -9999.0)


class Formatter:
    """Turns token ids and logprobs into the logprobs objects of each endpoint (vLLM's shapes).

    Completions (legacy format): ``top_logprobs`` is one ``{token text: logprob}`` per token holding the
    ``logprobs`` most likely tokens and always the sampled one, so up to N + 1 entries (OpenAI's
    documented behaviour). Chat: each token's ``top_logprobs`` lists the ``top_logprobs`` most likely
    tokens, most likely first.
    """

    def __init__(self, token_text: Callable[[int], str], num_top: int) -> None:
        self.token_text = token_text
        self.num_top = num_top

    def completion_logprobs(
        self,
        token_ids: list[int],
        lps: list[float],
        offset: int,
        tops: list[dict[int, float]] | None = None,
    ) -> CompletionLogprobs:
        toks = [self.token_text(t) for t in token_ids]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        top = []
        for i, (text, lp) in enumerate(zip(toks, lps)):
            ranked = tops[i] if tops and i < len(tops) else {}
            entry = {self.token_text(k): _finite(v) for k, v in list(ranked.items())[: self.num_top]}
            entry.setdefault(text, _finite(lp))
            top.append(entry)
        return CompletionLogprobs(
            tokens=toks, token_logprobs=[_finite(lp) for lp in lps], top_logprobs=top, text_offset=offsets
        )

    def chat_logprobs(
        self, token_ids: list[int], lps: list[float], tops: list[dict[int, float]] | None = None
    ) -> ChatChoiceLogprobs:
        content = []
        for i, (t, lp) in enumerate(zip(token_ids, lps)):
            text = self.token_text(t)
            ranked = tops[i] if tops and i < len(tops) else {}
            top = [self._chat_entry(k, v) for k, v in list(ranked.items())[: self.num_top]]
            raw = list(text.encode("utf-8"))
            content.append(ChatLogprob(token=text, logprob=_finite(lp), bytes=raw, top_logprobs=top))
        return ChatChoiceLogprobs(content=content)

    def _chat_entry(self, token_id: int, lp: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}


async def sse_stream(
    handle: RequestHandle,
    make_chunk: Callable[[StepOutput], str | None],
    make_usage_chunk: Callable[[], str] | None,
) -> AsyncIterator[str]:
    """``data: ...`` events for each delta, an optional usage event, then ``data: [DONE]``.

    Cancellation (the client disconnected) and errors end in ``handle.close()``, which aborts the
    request in the engine if it had not finished.
    """
    try:
        async for delta in handle:
            body = make_chunk(delta)
            if body is not None:
                yield f"data: {body}\n\n"
        if make_usage_chunk is not None:
            yield f"data: {make_usage_chunk()}\n\n"
    except Exception as exc:  # the status line is sent: report in-band, as OpenAI does
        yield sse_error(exc)
    finally:
        handle.close()
    yield "data: [DONE]\n\n"
