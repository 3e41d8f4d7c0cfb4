"""The request body's ``priority`` reaches the real engine: a late high-priority request overtakes.

The engine steps only when the test allows it, so "late" is exact (the high-priority request arrives
after three engine steps) and the finish order is read from the step each request finished in, not
from wall-clock timing.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine

MAX_TOKENS = 16


class SteppedEngine:
    """The real engine, but :meth:`step` runs only while ``allowed`` steps remain (else returns no
    output at once); records the step each request finished in and the prompt of each request id."""

    def __init__(self, engine) -> None:
        self._ex = engine
        self.allowed = 0
        self.steps = 0
        self.finished_at: dict = {}
        self.prompts: dict = {}
        self.priorities: dict = {}

    def __getattr__(self, name: str):
        return getattr(self._ex, name)

    def add_request(self, prompt, sampling_params=None, request_id=None, **kw):
        rid = self._ex.add_request(prompt, sampling_params, request_id=request_id, **kw)
        self.prompts[rid] = tuple(prompt)
        self.priorities[rid] = kw.get("priority", 0)
        return rid

    def step(self):
        if self.steps >= self.allowed:
            time.sleep(0.002)
            return []
        outputs = self._ex.step()
        self.steps += 1
        for o in outputs:
            if o.finished:
                self.finished_at[o.request_id] = self.steps
        return outputs


async def _until(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("priority_mode", [False, True])
def test_late_high_priority_request_finishes_first(priority_mode) -> None:
    """Six priority-0 completions start (two per batch; the device pool cannot hold two whole requests,
    so the scheduler suspends to the host tier); after three steps one with ``"priority": 5`` arrives.
    With ``priority_mode`` it finishes before every earlier request; without it, last."""
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(12)] for _ in range(7)]
    ex = SteppedEngine(
        tiny_engine(
            tokens_per_block=4,
            num_device_blocks=10,
            num_host_blocks=64,
            max_batch_size=2,
            priority_mode=priority_mode,
        )
    )
    with LiveServer(ex) as srv:

        async def scenario():
            http = httpx.AsyncClient(trust_env=False, timeout=300)
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", http_client=http)

            def complete(prompt, priority):
                return asyncio.ensure_future(
                    client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                        extra_body={"ignore_eos": True, "priority": priority},
                    )
                )

            async with http:
                low = []
                for n, p in enumerate(prompts[:6], 1):  # one at a time: a known arrival order
                    low.append(complete(p, 0))
                    await _until(lambda n=n: len(ex.prompts) == n)
                ex.allowed = 3
                await _until(lambda: ex.steps == 3)
                high = complete(prompts[6], 5)
                await _until(lambda: len(ex.prompts) == 7)
                ex.allowed = 10**9
                return await asyncio.gather(*low, high)

        got = asyncio.run(scenario())
    assert all(g.usage.completion_tokens == MAX_TOKENS for g in got)
    by_prompt = {ex.prompts[rid]: step for rid, step in ex.finished_at.items()}
    steps = [by_prompt[tuple(p)] for p in prompts]
    assert len(set(steps)) == 7  # one finish per step: the order is strict
    order = sorted(range(7), key=lambda i: steps[i])
    assert order == ([6, 0, 1, 2, 3, 4, 5] if priority_mode else [0, 1, 2, 3, 4, 5, 6])
    assert sorted(ex.priorities.values()) == [0] * 6 + [5]
    assert ex.stats.num_paused > 0


def test_priority_field_on_chat_and_bad_values() -> None:
    ex = SteppedEngine(tiny_engine())
    ex.allowed = 10**9
    with LiveServer(ex) as srv:
        client = srv.client()
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            extra_body={"priority": -4, "ignore_eos": True},
        )
        assert out.usage.completion_tokens == 3
        assert list(ex.priorities.values()) == [-4]
        for bad in ("high", 1.5, True):
            with pytest.raises(openai.BadRequestError, match="priority"):
                client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"priority": bad})
        assert len(ex.priorities) == 1  # refused before reaching the engine
