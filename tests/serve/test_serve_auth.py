"""`--api-key`: a Bearer key on every path but /health (and /metrics with --metrics-open), over the real
tiny engine; the key's resolution from the flag and KVSCHED_API_KEY."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine

from kvsched.cli import build_parser
from kvsched.core.errors import ConfigError
from kvsched.serve.app import ServerOptions, build_app
from kvsched.serve.auth import ENV_VAR, resolve_api_key
from kvsched.serve.backend import EngineBackend

KEY = "sk-test-0123456789"
BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def ex():
    return tiny_engine()


@pytest.fixture(scope="module")
def keyed(ex):
    with LiveServer(ex, ServerOptions(api_key=KEY)) as srv:
        yield srv


def _get(srv: LiveServer, path: str, key: str | None = None, scheme: str = "Bearer") -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"{scheme} {key}"}
    return httpx.get(srv.url + path, headers=headers, trust_env=False, timeout=30)


def _post(srv: LiveServer, body, key: str | None = None, path: str = "/v1/completions") -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(srv.url + path, headers=headers, trust_env=False, timeout=30, **kw)


def _assert_401(resp: httpx.Response, message_part: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    err = resp.json()["error"]
    assert err["type"] == "AuthenticationError" and err["code"] == 401
    assert message_part in err["message"]


def test_missing_wrong_and_right_key(keyed) -> None:
    _assert_401(_post(keyed, BODY), "missing API key")
    _assert_401(_post(keyed, BODY, key="sk-wrong"), "invalid API key")
    _assert_401(_post(keyed, BODY, key=KEY[:-1]), "invalid API key")  # a prefix of the key
    _assert_401(_post(keyed, BODY, key=KEY + "x"), "invalid API key")
    _assert_401(_get(keyed, "/v1/models", key=KEY, scheme="Basic"), "missing API key")
    ok = _post(keyed, BODY, key=KEY)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert _get(keyed, "/v1/models", key=KEY, scheme="bearer").status_code == 200  # scheme: any case


def test_openai_client_sends_the_key(keyed) -> None:
    def client(key: str) -> openai.OpenAI:
        http = httpx.Client(trust_env=False)
        return openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, http_client=http)

    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    out = client(KEY).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert out.usage.completion_tokens == 3
    chunks = client(KEY).completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True)
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_key_is_checked_before_the_body(keyed, ex) -> None:
    """An unauthenticated request is refused before its body is read: a malformed body is a 401, not a
    400, and the engine never sees an unauthenticated prompt."""
    _assert_401(_post(keyed, b"{not json"), "missing API key")
    assert _post(keyed, b"{not json", key=KEY).status_code == 400
    before = ex.kv.stats().reuse_miss_tokens + ex.kv.stats().reuse_hit_tokens
    _assert_401(_post(keyed, {**BODY, "prompt": list(range(100, 180))}), "missing API key")
    assert ex.kv.stats().reuse_miss_tokens + ex.kv.stats().reuse_hit_tokens == before


def test_open_and_closed_paths(keyed) -> None:
    assert _get(keyed, "/health").status_code == 200
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/no-such-route", "/"):
        _assert_401(_get(keyed, path), "missing API key")
    assert _get(keyed, "/metrics", key=KEY).text.startswith("#")
    assert "/v1/completions" in _get(keyed, "/openapi.json", key=KEY).json()["paths"]
    assert _get(keyed, "/docs", key=KEY).status_code == 200
    assert _get(keyed, "/v1/no-such-route", key=KEY).status_code == 404


def test_metrics_open(ex) -> None:
    with LiveServer(ex, ServerOptions(api_key=KEY, metrics_open=True)) as srv:
        resp = _get(srv, "/metrics")
        assert resp.status_code == 200 and "kvsched:" in resp.text
        _assert_401(_get(srv, "/v1/models"), "missing API key")
        _assert_401(_get(srv, "/openapi.json"), "missing API key")


def test_without_a_key_everything_is_open(ex) -> None:
    with LiveServer(ex) as srv:
        for path in ("/health", "/metrics", "/v1/models", "/openapi.json"):
            assert _get(srv, path).status_code == 200, path
        assert _post(srv, BODY).status_code == 200


def test_resolve_api_key() -> None:
    assert resolve_api_key(None, {}) is None
    assert resolve_api_key(None, {ENV_VAR: ""}) is None  # an empty variable counts as unset
    assert resolve_api_key(None, {ENV_VAR: "k-env"}) == "k-env"
    assert resolve_api_key("k-flag", {ENV_VAR: "k-env"}) == "k-flag"
    for bad in ("", "two words", "tab\tkey", "clé", "k\n"):
        with pytest.raises(ConfigError, match="API key"):
            resolve_api_key(bad, {})
    with pytest.raises(ConfigError, match="API key"):
        resolve_api_key(None, {ENV_VAR: "with space"})


def test_build_app_refuses_an_unusable_key(ex) -> None:
    with pytest.raises(ConfigError, match="API key"):
        build_app(EngineBackend(ex), MODEL, ServerOptions(api_key=""))


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--api-key", KEY, "--metrics-open", "--tenant-salt-header", "X-Tenant"]
    )
    assert (args.api_key, args.metrics_open, args.tenant_salt_header) == (KEY, True, "X-Tenant")
    args = build_parser().parse_args(["serve"])
    assert (args.api_key, args.metrics_open, args.tenant_salt_header) == (None, False, None)
