"""Backpressure (429), client disconnects (abort + KV freed), clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from fake_engine import FakeEngine, expected_text
from live_server import MODEL, LiveServer

from kvsched.serve.app import ServerOptions


def _wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_queue_full_answers_429_then_recovers() -> None:
    fake = FakeEngine()
    with LiveServer(fake, ServerOptions(max_waiting=2)) as srv:
        fake.step_gate.clear()  # the engine blocks in its first step: nothing gets a first token

        async def scenario() -> tuple[list[int], httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c:
                body = {"model": MODEL, "prompt": "q", "max_tokens": 3}
                held = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
                while srv.engine.num_waiting < 2:
                    await asyncio.sleep(0.01)
                rejected = await c.post("/v1/completions", json=body)
                fake.step_gate.set()
                return [(await t).status_code for t in held], rejected

        codes, rejected = asyncio.run(scenario())
        assert rejected.status_code == 429
        assert "waiting" in rejected.json()["error"]["message"]
        assert codes == [200, 200]
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"model": MODEL, "prompt": "q", "max_tokens": 3},
            trust_env=False,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text([ord("q")], 3)


def test_disconnect_mid_stream_aborts_and_frees_kv() -> None:
    fake = FakeEngine(step_delay_s=0.002)
    with LiveServer(fake) as srv:
        with httpx.Client(trust_env=False, timeout=30) as c:
            body = {"model": MODEL, "prompt": "abandon", "max_tokens": 400, "stream": True}
            with c.stream("POST", srv.url + "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
                assert got and fake.used_blocks > 0
        assert _wait_for(lambda: fake.num_aborted == 1)
        assert _wait_for(lambda: fake.used_blocks == 0 and not fake.has_unfinished_requests())
        assert _wait_for(lambda: srv.engine.num_in_flight == 0)
        line = 'kvsched:request_success_total{finished_reason="abort",model_name="fake-model"} 1.0'
        assert _wait_for(lambda: line in httpx.get(srv.url + "/metrics", trust_env=False).text)


def test_shutdown_aborts_unfinished_requests() -> None:
    fake = FakeEngine(step_delay_s=0.01)
    srv = LiveServer(fake, ServerOptions(drain_timeout_s=0.2))
    srv.thread.server.config.timeout_graceful_shutdown = 0.2
    srv.__enter__()
    outcome: dict = {}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c:
            body = {"model": MODEL, "prompt": "s", "max_tokens": 400, "stream": True}
            try:
                async with c.stream("POST", "/v1/completions", json=body) as resp:
                    outcome["lines"] = [ln async for ln in resp.aiter_lines() if ln]
            except httpx.HTTPError as exc:
                outcome["error"] = exc

    async def scenario() -> None:
        task = asyncio.create_task(client())
        while fake.used_blocks == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(srv.__exit__)
        await task

    asyncio.run(scenario())
    assert not srv.thread._thread.is_alive()
    assert not fake.has_unfinished_requests() and fake.used_blocks == 0
    assert fake.num_aborted == 1
    # the client saw an error event or a cut connection, never a normal finish of 400 tokens
    assert "error" in outcome or '"finish_reason":"length"' not in "".join(outcome.get("lines", []))


def test_non_streaming_client_gone_is_aborted() -> None:
    fake = FakeEngine(step_delay_s=0.002)
    with LiveServer(fake) as srv:
        body = {"model": MODEL, "prompt": "hang on", "max_tokens": 10}
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, trust_env=False, timeout=0.5)
        assert _wait_for(lambda: fake.num_aborted == 1)
        assert _wait_for(lambda: fake.used_blocks == 0 and not fake.has_unfinished_requests())


def test_engine_failure_fails_requests_and_keeps_serving() -> None:
    fake = FakeEngine()
    with LiveServer(fake) as srv:
        fake.fail_next_step = True
        body = {"model": MODEL, "prompt": "boom", "max_tokens": 5}
        r = httpx.post(srv.url + "/v1/completions", json=body, trust_env=False, timeout=30)
        assert r.status_code == 503 and "injected engine failure" in r.json()["error"]["message"]
        assert not fake.has_unfinished_requests() and fake.used_blocks == 0
        r = httpx.post(srv.url + "/v1/completions", json=body, trust_env=False, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(list(b"boom"), 5)


def test_stop_string_finishes_the_engine_request_and_frees_kv() -> None:
    fake = FakeEngine(step_delay_s=0.001)
    with LiveServer(fake) as srv:
        full = expected_text(list(b"hang stop"), 30)
        stop = full[8:10]
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "hang stop", "max_tokens": 30, "stop": stop, "stream": stream}
            r = httpx.post(srv.url + "/v1/completions", json=body, trust_env=False, timeout=30)
            if stream:
                text = "".join(
                    json.loads(ln[6:])["choices"][0]["text"]
                    for ln in r.text.splitlines()
                    if ln.startswith("data: {")
                )
            else:
                text = r.json()["choices"][0]["text"]
            assert text == full[: full.index(stop)]
        # "hang" requests never finish on their own: the engine's stop string ends them, no abort
        assert _wait_for(lambda: fake.used_blocks == 0 and not fake.has_unfinished_requests())
        assert fake.num_aborted == 0
        line = 'kvsched:request_success_total{finished_reason="stop",model_name="fake-model"} 2.0'
        assert _wait_for(lambda: line in httpx.get(srv.url + "/metrics", trust_env=False).text)
