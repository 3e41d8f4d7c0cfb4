"""Fuzzing the HTTP API with hypothesis-built bodies: never a 500, always an OpenAI-shaped JSON error, and
the same keep-alive connection serves a normal request right after every case.

Bodies start from a valid request and are broken the ways clients break them: a field set to a lone
surrogate, a huge or negative number, NaN or Infinity, a wrong type, deep nesting; unknown fields;
malformed JSON (truncated); bytes that are not UTF-8; nesting deep enough to overflow the JSON parser.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import FakeEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import MODEL, LiveServer

ENDPOINTS = {
    "/v1/completions": {"model": MODEL, "prompt": "fuzz", "max_tokens": 3},
    "/v1/chat/completions": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "fuzz"}],
        "max_tokens": 3,
    },
}
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "stop_token_ids", "ignore_eos", "priority", "n", "stream", "stream_options", "logprobs",
    "top_logprobs", "presence_penalty", "frequency_penalty", "user", "echo", "best_of", "suffix",
    "cache_salt", "add_generation_prompt", "no_such_field",
]  # fmt: skip
ERROR_KEYS = {"message", "type", "param", "code"}

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(
    st.text(max_size=20),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), surrogates, st.text(max_size=5)),
)
numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 0, -1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
KEYS = st.one_of(st.sampled_from([*FIELDS, "role", "content", "type", "text", "include_usage"]), texts)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), values), "content": values}
    ),
    max_size=3,
)


def _deep(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> bytes:
    body = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        # the prompt fields half the time: they reach the tokenizer, where the worst holes were
        field = draw(st.one_of(st.sampled_from(["prompt", "messages"]), st.sampled_from(FIELDS)))
        pick = [texts, numbers, values, st.builds(_deep, st.integers(10, 400))]
        body[field] = draw(st.one_of(messages, *pick) if field == "messages" else st.one_of(*pick))
    if isinstance(body.get("prompt"), str) and body["prompt"].startswith("hang"):
        body["prompt"] = "x" + body["prompt"]  # the fake never finishes a "hang..." prompt on its own
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals, surrogates as \ud800


@st.composite
def broken(draw: st.DrawFn, base: dict) -> bytes:
    raw = draw(mutated(base))
    kind = draw(st.sampled_from(["truncate", "bad_bytes", "deep", "not_object"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "bad_bytes":
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"]))
        return raw[:at] + junk + raw[at:]
    if kind == "deep":
        n = draw(st.integers(1_000, 100_000))
        return b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * n + b"]" * n + b"}"
    return draw(st.sampled_from([b"[]", b"null", b"1e999", b'"text"', b"NaN", b""]))


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.fixture(scope="module")
def live():
    with (
        LiveServer(FakeEngine(max_model_len=512)) as srv,
        httpx.Client(base_url=srv.url, trust_env=False, timeout=30) as client,
    ):
        yield srv, client


@pytest.mark.parametrize("path", list(ENDPOINTS))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bodies_never_500_and_keep_the_connection(live, path: str, data: st.DataObject) -> None:
    srv, client = live
    base = ENDPOINTS[path]
    raw = data.draw(st.one_of(mutated(base), broken(base)), label="body")
    before = client.post(path, json=base)
    assert before.status_code == 200
    port = _local_port(before)

    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 400, 404, 413), r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and err["code"] == r.status_code and err["message"]
    elif "text/event-stream" not in r.headers["content-type"]:
        assert r.json()["choices"]

    after = client.post(path, json=base)
    assert after.status_code == 200 and after.json()["choices"]
    assert _local_port(after) == port, "the keep-alive connection was dropped"


def test_known_holes_are_400s_on_the_same_connection(live) -> None:
    """The cases the issue found: a lone surrogate (a plain-text 500 that dropped the connection), a seed
    past 64 bits (an overflow in the sampler), NaN, non-UTF-8 bytes."""
    srv, client = live
    cases = [
        (b'{"model": "fake-model", "prompt": "\\ud800"}', "prompt"),
        (b'{"model": "fake-model", "prompt": "x", "seed": 18446744073709551616}', "seed"),
        (b'{"model": "fake-model", "prompt": "x", "seed": -9223372036854775809}', "seed"),
        (b'{"model": "fake-model", "prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"model": "fake-model", "prompt": "x", "stop": ["ok", "\\udfff"]}', "stop"),
        (b'{"model": "fake-model", "prompt": "\xff\xfe"}', None),
    ]
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    port = _local_port(ok)
    for raw, param in cases:
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["param"] == param, r.text
        r = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "seed": 2**63 - 1}
        )
        assert r.status_code == 200 and _local_port(r) == port
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]}
    r = client.post(
        "/v1/chat/completions", content=json.dumps(chat), headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
