"""One streaming request against any OpenAI-compatible server, timed token by token.

Works with ``/v1/completions`` and ``/v1/chat/completions``. Output tokens are taken from the
server's ``usage`` (asked for with ``stream_options.include_usage``) when it sends one, else counted
as content chunks. Every failure becomes a result with ``success=False`` and a message, never an
exception, so one bad request does not stop a benchmark.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from kvsched.bench.datasets import SampleRequest

Endpoint = Literal["completions", "chat"]


@dataclass(slots=True)
class RequestResult:
    """Timings of one request, in seconds; ``itl`` holds the gaps between content chunks."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""
    priority: int | None = None  # the priority it was sent with, if any

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for a single-token output)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(slots=True)
class RequestSpec:
    """What is constant across a benchmark's requests."""

    api_url: str
    model: str
    endpoint: Endpoint = "completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


def build_payload(spec: RequestSpec, sample: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": sample.expected_output_len,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        payload["ignore_eos"] = True  # vLLM-style extension; fixes the output length
    if sample.priority is not None:
        payload["priority"] = sample.priority  # extension (kvsched: higher first; vLLM: lower first)
    if spec.endpoint == "chat":
        content = sample.prompt if isinstance(sample.prompt, str) else json.dumps(sample.prompt)
        payload["messages"] = [{"role": "user", "content": content}]
    else:
        payload["prompt"] = sample.prompt
    payload.update(spec.extra_body)
    return payload


def _chunk_text(obj: dict[str, Any], endpoint: Endpoint) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return delta.get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, sample: SampleRequest) -> RequestResult:
    """Send ``sample`` streaming and time it. Never raises for server or network errors."""
    result = RequestResult(prompt_len=sample.prompt_len, priority=sample.priority)
    payload = build_payload(spec, sample)
    text_parts: list[str] = []
    chunks = 0
    usage_tokens: int | None = None
    start = result.start_time = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", spec.api_url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {obj['error']}"
                    return result
                text = _chunk_text(obj, spec.endpoint)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    text_parts.append(text)
                usage = obj.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    result.prompt_len = usage.get("prompt_tokens") or result.prompt_len
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.generated_text = "".join(text_parts)
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if chunks == 0:
        result.error = "the server streamed no content"
        return result
    result.success = True
    return result
