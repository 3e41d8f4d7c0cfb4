"""Runtime LoRA updating through the server: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
behind ``ServerOptions.enable_lora_runtime_updates`` (``--enable-lora-runtime-updates``), off by default.

A loaded adapter answers exactly as an engine started with it; an unloaded one is a 404 again; the
refusals are OpenAI-shaped errors (404 unknown name or path, 400 bad adapter, duplicate or too large,
409 while a request uses the adapter).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer
from test_serve_lora import ADAPTERS, CHAT, PROMPT, N, _offline, _write_adapter
from tiny_engine import ENGINE_KW, TINY

from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.loader import default_model_path, load_model
from kvsched.serve.app import ServerOptions

pytest.importorskip("safetensors.torch")
ON = ServerOptions(enable_lora_runtime_updates=True)


def _engine(**kw) -> Engine:
    args = EngineArgs(**ENGINE_KW, **kw)
    loaded = load_model(default_model_path(), dummy_config=TINY, seed=0)  # its own copy: LoRA wraps it
    return Engine(args, parts=build_engine_parts(args, loaded=loaded))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-lora-runtime")
    return {
        name: str(_write_adapter(root / name, r, t, rs, seed=i))
        for i, (name, (r, t, rs)) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def expected(paths) -> dict[str, tuple[str, str]]:
    """Offline answers of an engine started with the adapters (``--lora-modules``)."""
    ex = _engine(lora_modules=paths)
    return {lora: (_offline(ex, PROMPT, lora), _offline(ex, CHAT, lora)) for lora in ADAPTERS}


def _post(srv: LiveServer, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/{route}", json=body, trust_env=False, timeout=60)


def _error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert all(w in err["message"] for w in words), err
    return err


def test_load_serves_like_a_startup_adapter_and_unload_removes_it(paths, expected) -> None:
    common = {"max_tokens": N, "temperature": 0, "extra_body": {"ignore_eos": True}}
    with LiveServer(_engine(enable_lora=True), ON) as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
        for name in ADAPTERS:
            resp = _post(srv, "load_lora_adapter", {"lora_name": name, "lora_path": paths[name]})
            assert resp.status_code == 200 and name in resp.text
        assert [m.id for m in client.models.list().data] == [MODEL, *ADAPTERS]
        for name in ADAPTERS:
            got = client.completions.create(model=name, prompt=PROMPT, **common)
            assert got.model == name and got.choices[0].text == expected[name][0]
            chat = client.chat.completions.create(model=name, messages=CHAT, **common)
            assert chat.choices[0].message.content == expected[name][1]
        assert _post(srv, "unload_lora_adapter", {"lora_name": "sql"}).status_code == 200
        assert [m.id for m in client.models.list().data] == [MODEL, "poet"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
        again = client.completions.create(model="poet", prompt=PROMPT, **common)
        assert again.choices[0].text == expected["poet"][0]


def test_flag_off_both_routes_are_404(paths) -> None:
    with LiveServer(_engine(lora_modules=paths)) as srv:
        _error(_post(srv, "load_lora_adapter", {"lora_name": "x", "lora_path": paths["sql"]}), 404)
        _error(_post(srv, "unload_lora_adapter", {"lora_name": "sql"}), 404)
        assert [m.id for m in srv.client().models.list().data] == [MODEL, *ADAPTERS]  # still serving


def test_errors_are_openai_shaped(paths, tmp_path) -> None:
    with LiveServer(_engine(enable_lora=True), ON) as srv:
        err = _error(
            _post(srv, "load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "no")}),
            404,
            "is not a directory",
        )
        assert err["type"] == "NotFoundError" and err["param"] == "lora_path"
        (tmp_path / "empty").mkdir()
        _error(
            _post(srv, "load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "empty")}),
            400,
            "missing",
        )
        _error(_post(srv, "load_lora_adapter", {"lora_name": MODEL, "lora_path": paths["sql"]}), 400, "base")
        _error(_post(srv, "load_lora_adapter", {"lora_name": "x"}), 400, "lora_path")
        assert (
            _post(srv, "load_lora_adapter", {"lora_name": "sql", "lora_path": paths["sql"]}).status_code
            == 200
        )
        _error(
            _post(srv, "load_lora_adapter", {"lora_name": "sql", "lora_path": paths["poet"]}),
            400,
            "already loaded",
        )
        err = _error(_post(srv, "unload_lora_adapter", {"lora_name": "nope"}), 404, "'nope' is not loaded")
        assert err["type"] == "NotFoundError"
    with LiveServer(_engine(enable_lora=True, max_lora_pages=1, lora_page_bytes=64), ON) as srv:
        _error(
            _post(srv, "load_lora_adapter", {"lora_name": "sql", "lora_path": paths["sql"]}),
            400,
            "the device budget is 1",
        )
        assert [m.id for m in srv.client().models.list().data] == [MODEL]


def _wait(cond) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _hold(engine):  # noqa: ANN001, ANN202 - the server's AsyncEngine
    """Hold the engine thread on a gate (an ``AsyncEngine.call``) and return once it waits there, so
    every command queued afterwards stays queued, in the order it came. Returning as soon as the call
    is queued let a test's count of queued commands include the gate's own: under load the next two
    commands could then queue in either order (seen in CI: an unload answered 409)."""
    gate, inside = threading.Event(), threading.Event()

    def wait() -> None:
        inside.set()
        gate.wait()

    held = asyncio.run_coroutine_threadsafe(engine.call(wait), engine._loop)
    assert inside.wait(30), "the engine thread never reached the gate"
    return gate, held


def test_unload_while_in_use_is_409_then_succeeds(paths) -> None:
    """A request queued before the unload command is live when the unload runs: 409. The engine thread
    is held on a gate (an ``AsyncEngine.call``) so both commands queue behind it in a known order."""
    with LiveServer(_engine(enable_lora=True), ON) as srv:
        loaded = _post(srv, "load_lora_adapter", {"lora_name": "sql", "lora_path": paths["sql"]})
        assert loaded.status_code == 200
        engine = srv.engine
        gate, held = _hold(engine)
        with ThreadPoolExecutor(2) as pool:
            body = {"model": "sql", "prompt": PROMPT, "max_tokens": 4}
            gen = pool.submit(_post, srv, "completions", body)
            _wait(lambda: engine.num_waiting == 1)
            unload = pool.submit(_post, srv, "unload_lora_adapter", {"lora_name": "sql"})
            _wait(lambda: len(engine._cmds) == 2)  # add, then unload, behind the gate
            gate.set()
            err = _error(unload.result(), 409, "'sql' is in use by 1 unfinished request")
            assert err["type"] == "ConflictError"
            assert gen.result().status_code == 200
        held.result(30)
        assert _post(srv, "unload_lora_adapter", {"lora_name": "sql"}).status_code == 200
        assert [m.id for m in srv.client().models.list().data] == [MODEL]


def test_request_admitted_before_an_unload_that_runs_first_is_404(paths) -> None:
    """The unload is queued first and the request (whose model check passed) after it: 404, not 400."""
    with LiveServer(_engine(enable_lora=True), ON) as srv:
        loaded = _post(srv, "load_lora_adapter", {"lora_name": "sql", "lora_path": paths["sql"]})
        assert loaded.status_code == 200
        engine = srv.engine
        gate, held = _hold(engine)
        with ThreadPoolExecutor(2) as pool:
            unload = pool.submit(_post, srv, "unload_lora_adapter", {"lora_name": "sql"})
            _wait(lambda: len(engine._cmds) == 1)
            gen = pool.submit(_post, srv, "completions", {"model": "sql", "prompt": PROMPT, "max_tokens": 2})
            _wait(lambda: len(engine._cmds) == 2)  # unload, then add, behind the gate
            gate.set()
            assert unload.result().status_code == 200
            err = _error(gen.result(), 404, "`sql` does not exist")
            assert err["param"] == "model"
        held.result(30)


def test_flag_parses_and_defaults_off() -> None:
    from kvsched.cli import build_parser

    assert build_parser().parse_args(["serve"]).enable_lora_runtime_updates is False
    args = build_parser().parse_args(["serve", "--enable-lora-runtime-updates"])
    assert args.enable_lora_runtime_updates is True and args.enable_lora is False  # cli.run turns it on
    assert ServerOptions().enable_lora_runtime_updates is False
