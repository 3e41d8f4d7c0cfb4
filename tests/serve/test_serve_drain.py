"""Shutdown past the drain timeout: every open stream ends with an in-band error event and ``[DONE]``, a
waiting non-streaming request gets a JSON 503, requests that finish within the drain finish normally,
and nothing is cancelled mid-body or logged with a traceback."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fake_engine import FakeEngine, expected_text
from live_server import MODEL, LiveServer

from kvsched.serve.app import ServerOptions


def test_shutdown_past_the_drain_ends_streams_with_an_error_event(capfd: pytest.CaptureFixture) -> None:
    fake = FakeEngine(step_delay_s=0.01)
    srv = LiveServer(fake, ServerOptions(drain_timeout_s=1.0))
    srv.__enter__()
    out: dict = {}

    async def stream(name: str, body: dict) -> None:
        async with (
            httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c,
            c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp,
        ):
            out[name] = [ln async for ln in resp.aiter_lines() if ln]

    async def plain(name: str, body: dict) -> None:
        async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c:
            out[name] = await c.post("/v1/completions", json=body)

    async def scenario() -> None:
        tasks = [
            asyncio.create_task(stream("cut", {"model": MODEL, "prompt": "hang on", "max_tokens": 400})),
            asyncio.create_task(plain("cut_plain", {"model": MODEL, "prompt": "hang in", "max_tokens": 400})),
            asyncio.create_task(stream("short", {"model": MODEL, "prompt": "short", "max_tokens": 20})),
        ]
        while srv.engine.num_in_flight < 3 or fake.used_blocks == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(srv.__exit__)
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert not srv.thread._thread.is_alive()

    cut = out["cut"]
    assert cut[-1] == "data: [DONE]"
    error = json.loads(cut[-2].removeprefix("data: "))["error"]
    assert (
        error["code"] == 503 and "shut down" in error["message"] and "drain timeout 1 s" in error["message"]
    )
    assert all('"finish_reason":"length"' not in ln for ln in cut)

    r = out["cut_plain"]
    assert r.status_code == 503 and "shut down" in r.json()["error"]["message"]

    short = out["short"]  # finished within the drain: a normal end
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in short if ln.startswith("data: {"))
    assert text == expected_text(list(b"short"), 20) and short[-1] == "data: [DONE]"

    assert fake.num_aborted == 2 and fake.used_blocks == 0 and not fake.has_unfinished_requests()
    logs = capfd.readouterr().err
    assert "Traceback" not in logs and "Cancel" not in logs, logs
