"""Tenant isolation of the prefix cache over the real tiny engine: a body ``cache_salt`` and a gateway's
``--tenant-salt-header`` scope prefix reuse (read from the KV manager's reuse counters)."""

from __future__ import annotations

import random

import httpx
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine

from kvsched.core.errors import ConfigError, InvalidRequestError
from kvsched.core.request import SamplingParams
from kvsched.serve.app import ServerOptions, build_app
from kvsched.serve.backend import EngineBackend
from kvsched.serve.tenancy import salt_id

HEADER = "X-Tenant"
PROMPT_LEN = 64  # 3 whole blocks of 16 can be reused (the last prompt token is always computed)
REUSABLE = 48
_rng = random.Random(14)


@pytest.fixture(scope="module")
def tenant_server():
    ex = tiny_engine()
    with LiveServer(ex, ServerOptions(tenant_salt_header=HEADER)) as srv:
        yield srv, ex


def _prompt() -> list[int]:
    """A fresh prompt, so no other test's cached blocks can match it."""
    return [_rng.randrange(100, 40000) for _ in range(PROMPT_LEN)]


def _complete(srv_ex, prompt, *, salt=None, tenant=None) -> tuple[int, str]:
    """Send one completion; returns (prompt tokens it reused from the cache, its text)."""
    srv, ex = srv_ex
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {} if tenant is None else {HEADER: tenant}
    before = ex.kv.stats().reuse_hit_tokens
    resp = httpx.post(srv.url + "/v1/completions", json=body, headers=headers, trust_env=False, timeout=30)
    assert resp.status_code == 200, resp.text
    return ex.kv.stats().reuse_hit_tokens - before, resp.json()["choices"][0]["text"]


def test_different_salts_never_share_same_salt_does(tenant_server) -> None:
    prompt = _prompt()
    assert _complete(tenant_server, prompt, salt="tenant-a")[0] == 0
    hit_b, text_b = _complete(tenant_server, prompt, salt="tenant-b")
    assert hit_b == 0
    hit_a, text_a = _complete(tenant_server, prompt, salt="tenant-a")
    assert hit_a == REUSABLE
    assert text_a == text_b  # reuse changes where the KV comes from, not the greedy answer
    assert _complete(tenant_server, prompt)[0] == 0  # no salt: the shared scope, empty for this prompt
    assert _complete(tenant_server, prompt)[0] == REUSABLE


def test_tenant_header_scopes_and_wins(tenant_server) -> None:
    prompt = _prompt()
    assert _complete(tenant_server, prompt, tenant="t1")[0] == 0
    assert _complete(tenant_server, prompt, tenant="t2")[0] == 0
    assert _complete(tenant_server, prompt, tenant="t1")[0] == REUSABLE
    # A body salt cannot reach a tenant's scope: not with the tenant's name, not under another header.
    assert _complete(tenant_server, prompt, salt="t1")[0] == 0
    assert _complete(tenant_server, prompt, tenant="t2", salt="t1")[0] == 0
    # Within one tenant, the body salt splits the scope further and is reused on its own.
    assert _complete(tenant_server, prompt, tenant="t1", salt="t1")[0] == 0
    assert _complete(tenant_server, prompt, tenant="t1", salt="t1")[0] == REUSABLE


def test_chat_cache_salt(tenant_server) -> None:
    srv, ex = tenant_server
    text = " ".join(f"item{i}" for i in range(40))
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 3}

    def hit(salt: str) -> int:
        before = ex.kv.stats().reuse_hit_tokens
        resp = httpx.post(
            srv.url + "/v1/chat/completions", json={**body, "cache_salt": salt}, trust_env=False, timeout=30
        )
        assert resp.status_code == 200, resp.text
        return ex.kv.stats().reuse_hit_tokens - before

    assert hit("chat-a") == 0
    assert hit("chat-b") == 0
    assert hit("chat-a") >= REUSABLE


@pytest.mark.parametrize("salt", ["", 7, ["a"], None])
def test_bad_cache_salt_is_a_400(tenant_server, salt) -> None:
    srv, _ = tenant_server
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "cache_salt": salt}
    resp = httpx.post(srv.url + "/v1/completions", json=body, trust_env=False, timeout=30)
    if salt is None:  # explicit null: no salt
        assert resp.status_code == 200
        return
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "cache_salt"


def test_salt_id() -> None:
    assert salt_id(None, None) is None
    ids = {salt_id("a", None), salt_id(None, "a"), salt_id("ab", "c"), salt_id("a", "bc"), salt_id("", None)}
    assert len(ids) == 5 and all(isinstance(i, int) and 0 <= i < 2**64 for i in ids)
    assert salt_id("a", "b") == salt_id("a", "b")
    assert salt_id("\ud800", None) is not None  # a lone surrogate still maps (no 500)


def test_bad_header_name(tenant_server) -> None:
    _, ex = tenant_server
    with pytest.raises(ConfigError, match="tenant-salt-header"):
        build_app(EngineBackend(ex), MODEL, ServerOptions(tenant_salt_header="X Tenant"))


def test_engine_salt_scopes_reuse_and_is_typed() -> None:
    ex = tiny_engine()
    prompt, params = _prompt(), SamplingParams(max_tokens=2, temperature=0.0)

    def run(salt) -> int:
        rid = ex.add_request(prompt, params, cache_salt=salt)
        while ex.has_unfinished_requests():
            ex.step()
        return ex.pop_output(rid).num_cached_tokens

    assert (run(1), run(2), run(1), run(None), run(None)) == (0, 0, REUSABLE, 0, REUSABLE)
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        ex.add_request(prompt, params, cache_salt="tenant")
