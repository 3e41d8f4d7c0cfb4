"""The OpenAI routes through the official client against a live server (fake engine)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from fake_engine import FakeEngine, expected_text
from live_server import MODEL


def _chat_ids(messages) -> list[int]:
    return FakeEngine._chat(messages)


def test_completion_non_streaming(server) -> None:
    out = server.client().completions.create(model=MODEL, prompt="hello", max_tokens=7, temperature=0)
    assert out.choices[0].text == expected_text(list(b"hello"), 7)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 7, 12)
    assert out.object == "text_completion" and out.model == MODEL


def test_completion_token_id_prompt_and_logprobs(server) -> None:
    out = server.client().completions.create(model=MODEL, prompt=[104, 105], max_tokens=3, logprobs=1)
    assert out.choices[0].text == expected_text([104, 105], 3)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == [-0.5] * 3 and "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [0, 1, 2]


def test_completion_streaming_with_usage(server) -> None:
    stream = server.client().completions.create(
        model=MODEL, prompt="stream me", max_tokens=9, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(list(b"stream me"), 9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_chat_non_streaming_and_streaming(server) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = expected_text(_chat_ids(msgs), 6)
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(_chat_ids(msgs))
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(server) -> None:
    msgs = [{"role": "user", "content": "x"}]
    out = server.client().chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=2, logprobs=True, top_logprobs=1
    )
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == list(out.choices[0].message.content)
    assert content[0].top_logprobs[0].logprob == -0.5


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(server, stream) -> None:
    full = expected_text(list(b"stop test"), 20)
    stop = full[5:7]
    client = server.client()
    kw = {"model": MODEL, "prompt": "stop test", "max_tokens": 20, "stop": [stop, "never"]}
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kw).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == full[: full.index(stop)] and reason == "stop"


def test_bad_requests_get_4xx_while_others_go_on(server) -> None:
    client = server.client()
    long_result: dict = {}

    def long_request() -> None:
        chunks = client.completions.create(model=MODEL, prompt="long", max_tokens=300, stream=True)
        long_result["text"] = "".join(c.choices[0].text for c in chunks)

    server.fake.step_delay_s = 0.001
    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
        assert e.value.status_code == 400 and e.value.body["type"] == "BadRequestError"
        with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
            client.completions.create(model=MODEL, prompt="y" * 600, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "z" * 520}])
        with pytest.raises(openai.BadRequestError, match="n=1"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
        with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0, 256\)"):
            client.completions.create(model=MODEL, prompt=[1, 999], max_tokens=2)  # refused by the engine
        with httpx.Client(trust_env=False) as raw:
            r = raw.post(server.url + "/v1/completions", content=b'{"model": "fake-model", "prompt": ',
                         headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
            r = raw.post(server.url + "/v1/completions", json={"model": MODEL})
            assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    finally:
        worker.join(60)
        server.fake.step_delay_s = 0.0
    assert long_result["text"] == expected_text(list(b"long"), 300)


def test_models_health_metrics(server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    with httpx.Client(trust_env=False) as raw:
        assert raw.get(server.url + "/health").status_code == 200
        client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
        body = raw.get(server.url + "/metrics").text
    for name in (
        "kvsched:num_requests_running",
        "kvsched:num_requests_waiting",
        "kvsched:num_requests_paused",
        'kvsched:kv_cache_usage_perc{model_name="fake-model",tier="device"}',
        "kvsched:prefix_cache_hit_rate",
        "kvsched:num_suspends_total",
        "kvsched:time_to_first_token_seconds_bucket",
        "kvsched:e2e_request_latency_seconds_count",
    ):
        assert name in body, name
    gen = [ln for ln in body.splitlines() if ln.startswith("kvsched:generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 4
