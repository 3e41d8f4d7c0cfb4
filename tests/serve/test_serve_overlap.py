"""The server over an engine with async scheduling (``--async-scheduling``): the same answers as the
synchronous ``LLM.generate`` (plain, streamed, stop strings, under memory pressure), and clients that
disconnect mid-stream leave no KV block behind."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine, tiny_llm

from kvsched.core.request import SamplingParams

PROMPTS = [f"item {i}: " + "blue green red " * (4 + i % 5) for i in range(12)]


def _body(i: int, prompt: str, stream: bool) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 10 + i, "temperature": 0, "stream": stream}
    if i % 3 == 1:
        body["stop"] = ["e"]
    return body


def _params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=10 + i, temperature=0.0, stop=["e"] if i % 3 == 1 else None)


async def _ask(c: httpx.AsyncClient, i: int, prompt: str, stream: bool, drop_after: int | None) -> tuple:
    body = _body(i, prompt, stream)
    if not stream:
        r = await c.post("/v1/completions", json=body)
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, reason, chunks = "", None, 0
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            reason = choice["finish_reason"] or reason
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return "dropped", None
    return text, reason


def test_server_answers_equal_the_synchronous_engine_and_disconnects_free_kv() -> None:
    want = [
        (o.outputs[0].text, o.outputs[0].finish_reason)
        for o in (tiny_llm().generate([p], _params(i), use_tqdm=False)[0] for i, p in enumerate(PROMPTS))
    ]
    # 24 device blocks for 12 requests at once: requests are suspended to the host and resumed.
    ex = tiny_engine(async_scheduling=True, num_device_blocks=24, num_host_blocks=256, max_batch_size=12)
    assert ex._overlap is not None
    with LiveServer(ex) as srv:

        async def all_at_once() -> list:
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=300) as c:
                calls = [_ask(c, i, p, i % 2 == 0, None) for i, p in enumerate(PROMPTS)]
                calls += [_ask(c, i, p, True, 2) for i, p in enumerate(PROMPTS[:4])]  # disconnect
                return await asyncio.gather(*calls)

        got = asyncio.run(all_at_once())
        assert got[: len(PROMPTS)] == want
        deadline = time.monotonic() + 60
        while (srv.engine.num_in_flight or ex.has_unfinished_requests()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ex.has_unfinished_requests()
    stats = ex.kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
    assert ex.stats.num_paused > 0
