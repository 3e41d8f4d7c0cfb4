"""/metrics latencies come from the engine's one timing record (``RequestOutput.metrics``)."""

from __future__ import annotations

import asyncio
import time

import httpx
from fake_engine import FakeEngine
from live_server import MODEL, LiveServer

from kvsched.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvsched.serve.metrics import ServerMetrics

LABELS = {"model_name": "m"}


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **labels})


def test_histograms_read_the_engine_result() -> None:
    metrics = ServerMetrics("m")
    times = RequestMetrics(10.0, first_token_time=10.5, last_token_time=12.5, finished_time=12.75)
    times.num_generation_tokens = 5
    out = RequestOutput(7, None, [1, 2, 3], [CompletionOutput(0, "abcde", [4] * 5, "stop")], True, times)
    metrics.observe_finished("stop", out)
    assert _value(metrics, "kvsched:time_to_first_token_seconds_sum") == 0.5
    assert _value(metrics, "kvsched:time_per_output_token_seconds_sum") == 0.5  # 2 s over 4 gaps
    assert _value(metrics, "kvsched:e2e_request_latency_seconds_sum") == 2.75
    assert _value(metrics, "kvsched:prompt_tokens_total") == 3
    assert _value(metrics, "kvsched:generation_tokens_total") == 5
    metrics.observe_finished("error", None)  # refused by the engine: counted, nothing to time
    assert _value(metrics, "kvsched:request_success_total", finished_reason="error") == 1
    assert _value(metrics, "kvsched:e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "kvsched:prompt_tokens_total") == 3


def _wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_ttft_counts_from_the_server_receiving_the_request() -> None:
    """The server hands its arrival time to the engine: time a request waits for the engine thread
    (here 0.3 s behind a blocked step) is part of its TTFT."""
    fake = FakeEngine()
    with LiveServer(fake) as srv:

        async def scenario() -> int:
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=30) as c:
                body = {"model": MODEL, "prompt": "hang on", "max_tokens": 400, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as resp:
                    await anext(resp.aiter_lines())  # the first request runs, then the engine blocks
                    fake.step_gate.clear()
                    late = asyncio.ensure_future(
                        c.post("/v1/completions", json={"model": MODEL, "prompt": "b", "max_tokens": 2})
                    )
                    await asyncio.sleep(0.3)
                    fake.step_gate.set()
                    return (await late).status_code

        assert asyncio.run(scenario()) == 200

        metrics, labels = srv.app.state.metrics, {"model_name": MODEL}

        def ttft(sample: str, **extra: str) -> float | None:
            return metrics.registry.get_sample_value(
                f"kvsched:time_to_first_token_seconds_{sample}", {**labels, **extra}
            )

        assert _wait_for(lambda: ttft("count") == 2.0)  # the first one counts once it is aborted
        assert ttft("bucket", le="0.25") == 1.0  # only the first request
        assert ttft("sum") > 0.25
