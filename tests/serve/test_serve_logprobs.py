"""Top-N logprobs through the server over the real engine (tiny model, real tokenizer): the OpenAI shapes
(completions' legacy format, chat's), the engine's values, streaming that loses no token, N > 20 a 400."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine, tiny_llm

from kvsched.core.request import SamplingParams

PROMPT = "The capital of France is"
N = 4


@pytest.fixture(scope="module")
def tiny_server():
    with LiveServer(tiny_engine()) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference():
    llm = tiny_llm()
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, logprobs=N), use_tqdm=False)
    return llm.engine.tokenizer, out[0].outputs[0]


def test_completions_legacy_format_holds_the_engines_top_n(tiny_server, reference) -> None:
    tok, ref = reference
    out = tiny_server.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=N
    )
    lp = out.choices[0].logprobs
    texts = [tok.decode([t]) for t in ref.token_ids]
    assert lp.tokens == texts and "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    for got, want, sampled in zip(lp.top_logprobs, ref.top_logprobs, texts):
        assert len(want) == N and sampled in got  # the sampled token is always there (up to N + 1)
        for text, v in {tok.decode([k]): v for k, v in want.items()}.items():
            assert got[text] == pytest.approx(v, abs=1e-6)
        assert len(got) in (len(want), len(want) + 1)


def test_chat_format_lists_n_most_likely_first(tiny_server) -> None:
    msgs = [{"role": "user", "content": "Say something."}]
    out = tiny_server.client().chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=N
    )
    content = out.choices[0].logprobs.content
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == N
        values = [t.logprob for t in c.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert c.bytes == list(c.token.encode()) and all(
            t.bytes == list(t.token.encode()) for t in c.top_logprobs
        )
    plain = tiny_server.client().chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=3, temperature=0, logprobs=True
    )
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_sends_logprobs_for_every_token(tiny_server, endpoint) -> None:
    client = tiny_server.client()
    if endpoint == "completions":
        chunks = list(
            client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=N, stream=True
            )
        )
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        tops = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
        assert "".join(tokens) == "".join(c.choices[0].text for c in chunks)
    else:
        msgs = [{"role": "user", "content": "Count."}]
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=N,
                stream=True,
            )
        )  # fmt: skip
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        tokens, tops = [e.token for e in entries], [e.top_logprobs for e in entries]
        assert "".join(tokens) == "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(tokens) == len(tops) == 10


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                  "top_logprobs": 21}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    ],
)  # fmt: skip
def test_more_than_20_or_top_without_logprobs_is_a_400(tiny_server, path, extra) -> None:
    r = httpx.post(tiny_server.url + path, json={"model": MODEL, "max_tokens": 2, **extra}, trust_env=False)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == 400 and "logprobs" in err["message"]
