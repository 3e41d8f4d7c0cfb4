"""Limits and failure paths of the HTTP layer: body size (413), prompt length, max_tokens default and cap,
Retry-After on 429, an unexpected error as a JSON 500, and /health staying fast while a maximal prompt
is tokenized (the real tokenizer, off the event loop)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time

import httpx
import pytest
from fake_engine import ByteTokenizer, FakeEngine, expected_text
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine

from kvsched.cli import build_parser
from kvsched.serve.app import DEFAULT_MAX_TOKENS_CAP, ServerOptions
from kvsched.serve.guards import DEFAULT_MAX_REQUEST_BYTES

JSON = {"content-type": "application/json"}


def _client(srv: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=srv.url, trust_env=False, timeout=60)


def test_cli_defaults_match_the_server() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.max_request_bytes, args.max_tokens_cap) == (
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_TOKENS_CAP,
    )
    assert ServerOptions().max_tokens_cap == DEFAULT_MAX_TOKENS_CAP
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServerOptions(max_request_bytes=0)


def test_oversized_bodies_get_a_quick_413() -> None:
    with LiveServer(FakeEngine()) as srv, _client(srv) as c:
        big = b'{"model": "fake-model", "prompt": "' + b"a" * 10_000_000 + b'"}'
        t0 = time.perf_counter()
        r = c.post("/v1/completions", content=big, headers=JSON)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 413 and "4194304 bytes" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "RequestTooLargeError"
        assert elapsed < 5.0  # refused on Content-Length, without reading the body (~0.03 s here)

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(60):
                yield b"a" * 100_000

        r = c.post("/v1/chat/completions", content=chunks(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200


def test_prompt_longer_than_the_context_is_a_400_naming_the_limit() -> None:
    with LiveServer(FakeEngine(max_model_len=64)) as srv, _client(srv) as c:
        for prompt in ("x" * 64, list(range(64))):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "prompt"
            assert "maximum context length is 64 tokens" in err["message"] and "64 tokens" in err["message"]
        r = c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "y" * 64}]}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 63, "max_tokens": 1})
        assert r.status_code == 200  # 63 + 1 fits exactly


def test_max_tokens_default_and_cap() -> None:
    """vLLM's choice: a request over the context is a 400; a missing max_tokens means the rest of the
    context; the server cap clamps both (a clamped request ends with finish_reason "length")."""
    fake = FakeEngine(max_model_len=512)
    msgs = [{"role": "user", "content": "hi"}]
    n_prompt = len(FakeEngine._chat(msgs))
    with LiveServer(fake, ServerOptions(max_tokens_cap=20)) as srv, _client(srv) as c:
        for extra in ({}, {"max_tokens": 100}, {"max_completion_tokens": 100}):
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, **extra})
            body = r.json()
            assert body["usage"]["completion_tokens"] == 20, extra
            assert body["choices"][0]["finish_reason"] == "length"
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 5})
        assert r.json()["usage"]["completion_tokens"] == 5
        r = c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 513 - n_prompt}
        )
        assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]
    with (
        LiveServer(FakeEngine(max_model_len=512), ServerOptions(max_tokens_cap=None)) as srv,
        _client(srv) as c,
    ):
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
        assert r.json()["usage"]["completion_tokens"] == 512 - n_prompt


def test_429_carries_retry_after() -> None:
    fake = FakeEngine()
    with LiveServer(fake, ServerOptions(max_waiting=1)) as srv:
        fake.step_gate.clear()  # the engine holds in its first step: nothing gets a first token

        async def scenario() -> tuple[int, httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c:
                body = {"model": MODEL, "prompt": "q", "max_tokens": 3}
                held = asyncio.create_task(c.post("/v1/completions", json=body))
                while srv.engine.num_waiting < 1:
                    await asyncio.sleep(0.01)
                rejected = await c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user"}]})
                fake.step_gate.set()
                return (await held).status_code, rejected

        held, rejected = asyncio.run(scenario())
    assert held == 200 and rejected.status_code == 429
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "RateLimitError"


class _ExplodingTokenizer(ByteTokenizer):
    def encode(self, text: str) -> list[int]:
        if text == "explode":
            raise RuntimeError("secret internal detail")
        return super().encode(text)


def test_unexpected_error_is_a_json_500_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEngine()
    fake.tokenizer = _ExplodingTokenizer()
    with LiveServer(fake) as srv, _client(srv) as c, caplog.at_level(logging.ERROR, "kvsched.serve"):
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 2})
        port = ok.extensions["network_stream"].get_extra_info("client_addr")[1]
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "explode"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "InternalServerError" and "RuntimeError" in err["message"]
        assert "secret" not in r.text and "Traceback" not in r.text
        again = c.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 2})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected_text(
            list(b"fine"), 2
        )
        assert again.extensions["network_stream"].get_extra_info("client_addr")[1] == port
    logged = [rec for rec in caplog.records if rec.name == "kvsched.serve" and rec.exc_info]
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])


# ------------------------------------------------------------------------------ the real tokenizer
@pytest.fixture(scope="module")
def tiny_server():
    with LiveServer(tiny_engine(), ServerOptions(max_request_bytes=2 * 1024 * 1024)) as srv:
        yield srv


def test_health_stays_fast_while_a_maximal_prompt_is_tokenized(tiny_server) -> None:
    """A prompt as large as the body limit allows (2 MiB here) takes the real tokenizer a second or more;
    it runs in a worker thread with the GIL released, so /health keeps answering. Before, tokenizing ran
    on the event loop: every probe waited for the whole tokenization. On a busy 2-core box one probe can
    still be delayed by the scheduler, so the median of the probes taken meanwhile is asserted."""
    srv = tiny_server
    text = "The quick brown fox jumps over the lazy dog. " * (2 * 1024 * 1024 // 46)
    body = {"model": MODEL, "prompt": text[: 2 * 1024 * 1024 - 100], "max_tokens": 1}
    result: dict = {}

    def big() -> None:
        with _client(srv) as c:
            result["response"] = c.post("/v1/completions", json=body)

    worker = threading.Thread(target=big)
    latencies: list[float] = []
    with _client(srv) as probe:
        probe.get("/health")  # connect first
        worker.start()
        time.sleep(0.2)  # the body is uploaded and parsed; tokenizing starts
        while worker.is_alive():
            t0 = time.perf_counter()
            assert probe.get("/health").status_code == 200
            if worker.is_alive():
                latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    worker.join()
    r = result["response"]
    assert r.status_code == 400 and "maximum context length is 512 tokens" in r.json()["error"]["message"]
    assert len(latencies) >= 3, latencies
    assert statistics.median(latencies) < 0.1, latencies
    assert min(latencies) < 0.1


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_64_bit_seeds_run_in_the_real_sampler(tiny_server, seed: int) -> None:
    with _client(tiny_server) as c:
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 3, "temperature": 1.0, "seed": seed}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = c.post("/v1/completions", json={**body, "seed": 2**64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_real_tokenizer_never_sees_a_lone_surrogate(tiny_server) -> None:
    with _client(tiny_server) as c:
        for path, body in (
            ("/v1/completions", b'{"model": "fake-model", "prompt": "Once \\ud800 upon"}'),
            (
                "/v1/chat/completions",
                b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\udc00"}]}',
            ),
        ):
            r = c.post(path, content=body, headers=JSON)
            assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
        ok = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert ok.status_code == 200
