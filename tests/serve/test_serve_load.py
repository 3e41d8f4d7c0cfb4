"""A bounded load test over loopback: hundreds of concurrent streams, some abandoned mid-way."""

from __future__ import annotations

import asyncio
import json
import random
import ssl

import httpx
from fake_engine import FakeEngine, expected_text
from live_server import MODEL, LiveServer

NUM_CLIENTS = 120
DROP_EVERY = 4  # every 4th client disconnects after a few tokens


async def _one(c: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, str | None, int]:
    drop_after = 3 if i % DROP_EVERY == 0 else None
    prompt = f"hang {i}" if drop_after else f"load {i}"  # a "hang" request ends only by abort
    n = rng.randint(8, 40)
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, reason, usage_n = [], None, -1
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage_n = obj["usage"]["completion_tokens"]
            for ch in obj["choices"]:
                text.append(ch["text"])
                reason = ch["finish_reason"] or reason
            if drop_after is not None and len(text) >= drop_after:
                return "dropped", None, 0
    full = "".join(text)
    assert full == expected_text(list(prompt.encode()), n), i
    assert reason == "length" and usage_n == n
    return "done", reason, n


def test_hundreds_of_streams_with_disconnects() -> None:
    fake = FakeEngine(num_device_blocks=3000, max_batch_size=128, step_delay_s=0.001)
    with LiveServer(fake) as srv:

        async def scenario():
            # small pools: httpcore scans its whole pool per request, one pool of 240 is quadratic
            ctx, limits = (
                ssl.create_default_context(),
                httpx.Limits(max_connections=8, max_keepalive_connections=0),
            )
            clients = [
                httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=60, limits=limits, verify=ctx)
                for _ in range(NUM_CLIENTS // 8)
            ]
            rng = random.Random(0)
            try:
                return await asyncio.gather(
                    *(_one(clients[i % len(clients)], i, rng) for i in range(NUM_CLIENTS))
                )
            finally:
                for c in clients:
                    await c.aclose()

        results = asyncio.run(scenario())
        done = [r for r in results if r[0] == "done"]
        assert len(done) == NUM_CLIENTS - NUM_CLIENTS // DROP_EVERY
        deadline = asyncio.run(_settle(srv, fake))
        assert deadline, "engine did not go idle"
        assert fake.used_blocks == 0 and not fake.has_unfinished_requests()
        assert fake.num_aborted == NUM_CLIENTS // DROP_EVERY
        body = httpx.get(srv.url + "/metrics", trust_env=False).text
        assert 'kvsched:num_requests_running{model_name="fake-model"} 0.0' in body
        assert 'kvsched:kv_cache_usage_perc{model_name="fake-model",tier="device"} 0.0' in body


async def _settle(srv, fake, timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if srv.engine.num_in_flight == 0 and not fake.has_unfinished_requests():
            await asyncio.sleep(0.1)  # one more snapshot publication
            return True
        await asyncio.sleep(0.02)
    return False
