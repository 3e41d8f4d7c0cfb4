"""The server over the real engine (tiny random-weight Llama, real tokenizer): equality with
``LLM.generate``, bad requests, and a bounded load test with disconnects."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import ssl
import time

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine, tiny_llm

from kvsched.core.request import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def main():"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_server():
    ex = tiny_engine()
    with LiveServer(ex) as srv:
        yield srv, ex


@pytest.fixture(scope="module")
def reference():
    outs = tiny_llm().generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False
    )
    return [o.outputs[0] for o in outs]


def test_greedy_text_equals_llm_generate(tiny_server, reference) -> None:
    srv, _ = tiny_server
    client = srv.client()
    for prompt, ref in zip(PROMPTS, reference):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == ref.text
        assert out.choices[0].finish_reason == ref.finish_reason
        assert out.usage.completion_tokens == len(ref.token_ids)
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in chunks) == ref.text


def test_stop_string_matches_engine_stop(tiny_server, reference) -> None:
    srv, ex = tiny_server
    ref = next(r for r in reference if len(r.text.strip()) >= 6)
    stop = ref.text.strip()[3:5]
    prompt = PROMPTS[reference.index(ref)]
    want = (
        tiny_llm()
        .generate(
            [prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stop]), use_tqdm=False
        )[0]
        .outputs[0]
    )
    assert want.finish_reason == "stop"
    client = srv.client()
    got = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=stop
    )
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    chunks = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    deadline = time.monotonic() + 30  # the engine finished the request at the stop: KV is back
    while ex.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ex.has_unfinished_requests() and ex.kv.stats().used_device_blocks == 0


def test_a_stop_string_split_across_two_tokens_is_held_back_and_never_streamed(tiny_server) -> None:
    """The stop's first character arrives with one token, the rest with the next: the engine must hold
    that character back (nothing streamed is ever cut), and the stream ends right before it."""
    srv, _ = tiny_server
    client = srv.client()
    kw = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "stream": True}
    kw["extra_body"] = {"ignore_eos": True}
    pieces = [c.choices[0].text for c in client.completions.create(**kw)]
    full, ends = "".join(pieces), list(itertools.accumulate(len(p) for p in pieces))
    nonempty = [k for k, piece in enumerate(pieces) if piece]
    i, stop = next(  # two consecutive tokens whose boundary is the first place the stop occurs
        (a, pieces[a][-1] + pieces[b][0])
        for a, b in itertools.pairwise(nonempty)
        if full.find(pieces[a][-1] + pieces[b][0]) == ends[a] - 1
    )
    want = full[: ends[i] - 1]
    sent, reasons = "", []
    for c in client.completions.create(**kw, stop=stop):
        sent += c.choices[0].text
        reasons.append(c.choices[0].finish_reason)
        assert want.startswith(sent)  # never a character that the stop later cuts
    assert sent == want and reasons[-1] == "stop"


def test_chat_and_engine_side_errors(tiny_server) -> None:
    srv, ex = tiny_server
    client = srv.client()
    msgs = [{"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(ex.parts.apply_chat_template(msgs, True))
    with pytest.raises(openai.BadRequestError, match=r"must be in \[0, 49152\)"):
        client.completions.create(model=MODEL, prompt=[1, 49152], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=MODEL, prompt=[5] * 510, max_tokens=8)


async def _client(c: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, int]:
    drop = i % 4 == 0
    n = 400 if drop else rng.randint(4, 24)
    body = {
        "model": MODEL,
        "prompt": f"request {i}: "
        + " ".join(rng.choice(["red", "green", "blue"]) for _ in range(rng.randint(1, 30))),
        "max_tokens": n,
        "temperature": 0.8,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, usage = 0, None
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            chunks += bool(obj["choices"])
            usage = obj.get("usage") or usage
            if drop and chunks >= 3:
                return "dropped", 0
    assert usage["completion_tokens"] == n
    return "done", n


def test_load_with_disconnects_frees_everything(tiny_server) -> None:
    srv, ex = tiny_server
    num = 200

    async def scenario():
        ctx, limits = (
            ssl.create_default_context(),
            httpx.Limits(max_connections=8, max_keepalive_connections=0),
        )
        clients = [
            httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=120, limits=limits, verify=ctx)
            for _ in range(num // 8)
        ]
        rng = random.Random(1)
        try:
            return await asyncio.gather(*(_client(clients[i % len(clients)], i, rng) for i in range(num)))
        finally:
            for c in clients:
                await c.aclose()

    results = asyncio.run(scenario())
    assert sum(1 for r in results if r[0] == "done") == num - num // 4
    deadline = time.monotonic() + 60
    while (srv.engine.num_in_flight or ex.has_unfinished_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the idle engine publish its last snapshot
    assert not ex.has_unfinished_requests() and srv.engine.num_in_flight == 0
    stats = ex.kv.stats()
    assert stats.used_device_blocks == 0 and stats.num_requests == 0
    body = httpx.get(srv.url + "/metrics", trust_env=False).text
    assert (
        f'kvsched:request_success_total{{finished_reason="abort",model_name="{MODEL}"}} {num // 4}.0' in body
    )
    assert f'kvsched:num_requests_running{{model_name="{MODEL}"}} 0.0' in body
    assert f'kvsched:kv_cache_usage_perc{{model_name="{MODEL}",tier="device"}} 0.0' in body


def test_memory_pressure_suspends_to_host_and_output_is_unchanged() -> None:
    """A device pool far too small for the batch: the unified scheduler suspends requests to the host
    tier and resumes them; every answer still equals the unpressured ``LLM.generate``."""
    prompts = [f"item {i}: " + "blue green red " * (8 + i % 5) for i in range(16)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in tiny_llm().generate(prompts, params, use_tqdm=False)]
    ex = tiny_engine(num_device_blocks=24, num_host_blocks=256, max_batch_size=16)
    with LiveServer(ex) as srv:

        async def all_at_once():
            http = httpx.AsyncClient(trust_env=False, timeout=300)
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", http_client=http)
            async with http:
                return await asyncio.gather(
                    *(
                        client.completions.create(
                            model=MODEL,
                            prompt=p,
                            max_tokens=24,
                            temperature=0,
                            extra_body={"ignore_eos": True},
                        )
                        for p in prompts
                    )
                )

        got = asyncio.run(all_at_once())
        assert [g.choices[0].text for g in got] == want
        assert all(g.usage.completion_tokens == 24 for g in got)
        time.sleep(0.2)  # the idle engine publishes its last snapshot
        body = httpx.get(srv.url + "/metrics", trust_env=False).text
    suspends = float(
        next(ln for ln in body.splitlines() if ln.startswith("kvsched:num_suspends_total")).split()[-1]
    )
    resumes = float(
        next(ln for ln in body.splitlines() if ln.startswith("kvsched:num_resumes_total")).split()[-1]
    )
    assert suspends > 0 and resumes == suspends
    assert ex.kv.stats().used_device_blocks == 0 and ex.kv.stats().used_host_blocks == 0
