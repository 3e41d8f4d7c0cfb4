"""Engine replicas as Ray actors (``serve/replicas``) on a local Ray cluster started here: routing by
prefix, greedy equality with one in-process engine, the HTTP server over two replicas (/health,
/metrics, sessions), replicas killed idle and mid-run, and the Ray Serve application. One cluster and one
pair of replicas for the whole module (each replica loads a model); the tests run in file order."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")

from kvsched.core.request import SamplingParams  # noqa: E402
from kvsched.core.routing import make_router  # noqa: E402
from kvsched.engine.engine import Engine  # noqa: E402
from kvsched.engine.engine_args import EngineArgs  # noqa: E402
from kvsched.serve.app import build_app  # noqa: E402
from kvsched.serve.replicas.backend import ReplicatedBackend  # noqa: E402
from kvsched.serve.replicas.frontend import load_tokenizer  # noqa: E402
from kvsched.serve.replicas.launch import start_replicas  # noqa: E402
from kvsched.serve.server_thread import UvicornThread  # noqa: E402

PREFIX = "You are a terse assistant. Answer in one line, then stop writing. Question: "  # 76 bytes
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def _args(model_dir) -> EngineArgs:
    return EngineArgs(
        model=str(model_dir),
        max_model_len=256,
        tokens_per_block=16,
        num_device_blocks=128,
        num_host_blocks=0,
        max_batch_size=8,
    )


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(cluster, tiny_llama_dir):
    backend = start_replicas(_args(tiny_llama_dir), 2, "kv_aware")
    yield backend
    backend.shutdown()


def _run(backend, requests: dict[int, str], params: SamplingParams = GREEDY) -> dict:
    """Add ``requests`` (id -> prompt), step until none is unfinished; id -> (token ids, reason, error)."""
    for rid, prompt in requests.items():
        backend.add_request(backend.encode(prompt), params, rid)
    return _drain(backend)


def _drain(backend, timeout_s: float = 120.0, tokens: dict | None = None) -> dict:
    tokens, done = tokens if tokens is not None else defaultdict(list), {}
    deadline = time.monotonic() + timeout_s
    while backend.has_unfinished_requests():
        assert time.monotonic() < deadline, "replicas did not finish"
        for out in backend.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                done[out.request_id] = (tokens[out.request_id], out.finish_reason, out.error)
                backend.release(out.request_id)
    return done


def _engine_tokens(model_dir, prompts: dict[int, str]) -> dict[int, list[int]]:
    engine = Engine(_args(model_dir))
    for rid, prompt in prompts.items():
        engine.add_request(prompt, GREEDY, request_id=rid)
    return {o.request_id: o.outputs[0].token_ids for o in engine.run()}


def test_shared_prefix_lands_on_the_replica_that_holds_it(pair, tiny_llama_dir) -> None:
    first = _run(pair, {0: PREFIX + "What is two plus two?"})
    (holder,) = [i for i, r in enumerate(pair.replicas) if r.routed == 1]
    hits_before = [r.snapshot.prefix_hits for r in pair.replicas]
    prompts = {1: PREFIX + "Name a colour.", 2: PREFIX + "Why is the sky blue?"}
    later = {rid: _run(pair, {rid: p})[rid] for rid, p in prompts.items()}  # each after the last: no load
    assert pair.replicas[holder].routed == 3 and pair.replicas[1 - holder].routed == 0
    gained = [r.snapshot.prefix_hits - b for r, b in zip(pair.replicas, hits_before)]
    assert gained[holder] >= 2 * 64  # the prefix's 4 whole blocks, twice
    assert gained[1 - holder] == 0
    want = _engine_tokens(tiny_llama_dir, {0: PREFIX + "What is two plus two?", **prompts})
    got = {rid: toks for rid, (toks, reason, _) in {**first, **later}.items()}
    assert got == want


def test_unrelated_prompts_spread_and_equal_one_engine(pair, tiny_llama_dir) -> None:
    routed = [r.routed for r in pair.replicas]
    prompts = {10 + i: f"{i} unrelated prompt number {i}" for i in range(4)}
    got = _run(pair, prompts)
    spread = [r.routed - b for r, b in zip(pair.replicas, routed)]
    assert min(spread) >= 1  # no prefix anywhere: least-loaded, so both replicas serve
    assert {rid: v[0] for rid, v in got.items()} == _engine_tokens(tiny_llama_dir, prompts)
    assert all(reason == "length" for _, reason, _ in got.values())


def test_bad_request_is_the_engines_typed_error(pair) -> None:
    from kvsched.core.errors import DuplicateRequestError, InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"prompt token ids must be in \[0, 256\)"):
        pair.add_request([1, 999], GREEDY, "bad")
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len=256"):
        pair.add_request([1] * 250, SamplingParams(max_tokens=10), "long")
    pair.add_request([1, 2, 3], GREEDY, "dup")
    with pytest.raises(DuplicateRequestError):
        pair.add_request([1, 2, 3], GREEDY, "dup")
    pair.abort_request("dup")
    assert not pair.has_unfinished_requests()


@pytest.fixture(scope="module")
def server(pair):
    app = build_app(pair, "tiny")
    srv = UvicornThread(app).start()
    srv.backend = pair
    yield srv
    srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=srv.url + "/v1", api_key="none", max_retries=0, http_client=httpx.Client(trust_env=False)
    )


def test_http_over_two_replicas(server, tiny_llama_dir) -> None:
    client, prompt = _client(server), PREFIX + "Say hello."
    want = _engine_tokens(tiny_llama_dir, {0: prompt})[0]
    text = load_tokenizer(str(tiny_llama_dir)).decode(want)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == text and out.usage.completion_tokens == len(want)
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == text
    with pytest.raises(openai.BadRequestError, match="prompt token ids must be in"):
        client.completions.create(model="tiny", prompt=[1, 999], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    health = httpx.get(server.url + "/health", trust_env=False)
    assert health.status_code == 200
    assert [r["alive"] for r in health.json()["replicas"]] == [True, True]
    router, sessions = server.backend.router, []
    server.backend.router = _Recording(router, sessions)
    try:  # the OpenAI `user` field reaches the router as the session
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, user="alice")
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    finally:
        server.backend.router = router
    assert sessions == ["alice", None]
    series = _series(httpx.get(server.url + "/metrics", trust_env=False).text)
    routed = [
        series[f'kvsched:replica_requests_routed_total{{model_name="tiny",replica="{i}"}}'] for i in (0, 1)
    ]
    assert routed == [float(r.routed) for r in server.backend.replicas]
    assert sum(routed) == 12  # 8 direct (one aborted) + 4 here
    hits = [
        series[f'kvsched:replica_prefix_cache_hits_total{{model_name="tiny",replica="{i}"}}'] for i in (0, 1)
    ]
    assert hits == [float(r.snapshot.prefix_hits) for r in server.backend.replicas] and max(hits) >= 128
    for i in (0, 1):
        assert series[f'kvsched:replica_alive{{model_name="tiny",replica="{i}"}}'] == 1.0
    assert series['kvsched:prefix_cache_hits_total{model_name="tiny"}'] == sum(hits)


class _Recording:
    """A router that records the session of each choice and lets ``inner`` choose."""

    def __init__(self, inner, sessions: list) -> None:
        self.inner, self.sessions, self.wants_events = inner, sessions, inner.wants_events

    def choose(self, token_ids, loads, *, session=None, salt=None, lora_id=None) -> int:
        self.sessions.append(session)
        return self.inner.choose(token_ids, loads, session=session, salt=salt, lora_id=lora_id)

    def on_events(self, replica, events) -> None:
        self.inner.on_events(replica, events)

    def remove_replica(self, replica) -> None:
        self.inner.remove_replica(replica)


def _series(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}."""
    lines = (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    return {name: float(value) for name, value in lines}


def test_health_report_finds_a_replica_that_died_idle(pair, tiny_llama_dir) -> None:
    """/health pings each live replica (in its probe group), so an idle replica's death shows at once."""

    @ray.remote(num_cpus=0, concurrency_groups={"probe": 1})
    class Idle:
        def ping(self) -> int:
            return 0

    idle = Idle.remote()
    router = make_router("least_loaded", block_size=16)
    backend = ReplicatedBackend(
        [pair.replicas[0].actor, idle], pair.info, load_tokenizer(str(tiny_llama_dir)), router
    )
    assert [e["alive"] for e in asyncio.run(backend.health_report())] == [True, True]
    _kill(idle)
    report = asyncio.run(backend.health_report())
    assert [e["alive"] for e in report] == [True, False] and report[1]["error"] == "ActorDiedError"


@pytest.fixture(scope="module")
def round_robin(pair, server, tiny_llama_dir):
    """The same actors behind a round-robin router, so that placement is known (0, 1, 0, ...)."""
    server.stop()  # the first HTTP server's engine thread no longer drives these actors
    actors = [r.actor for r in pair.replicas]
    router = make_router("round_robin", block_size=16)
    return ReplicatedBackend(actors, pair.info, load_tokenizer(str(tiny_llama_dir)), router)


def _kill(actor) -> None:
    """``ray.kill`` and wait until the actor is gone (the kill is asynchronous: a step sent meanwhile
    could still run)."""
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_killed_replica_leaves_the_other_serving(round_robin, tiny_llama_dir) -> None:
    """100 -> 0 and 101 -> 1 both stream, then 102 -> 0, which has sent nothing when 0 is killed:
    100 fails with a clear error, 102 is retried on 1, 101 finishes."""
    rr = round_robin
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    for rid in (100, 101):
        rr.add_request(rr.encode(f"request {rid}"), long, rid)
    tokens: dict = defaultdict(list)
    deadline = time.monotonic() + 60
    while set(tokens) != {100, 101}:
        assert time.monotonic() < deadline
        for out in rr.step():
            tokens[out.request_id] += out.new_token_ids
    rr.add_request(rr.encode("request 102"), GREEDY, 102)
    _kill(rr.replicas[0].actor)
    done = _drain(rr, tokens=tokens)
    assert done[101][1] == "length" and len(done[101][0]) == 120
    assert done[102][1] == "length", done[102]  # retried on replica 1
    assert done[102][0] == _engine_tokens(tiny_llama_dir, {102: "request 102"})[102]
    assert done[100][1] == "error"
    assert "engine replica 0 died" in done[100][2] and "already sent tokens" in done[100][2]
    assert rr.num_retried == 1
    assert [h["alive"] for h in rr.health()] == [False, True]
    after = _run(rr, {103: "after the crash"})  # round-robin skips the dead replica
    assert after[103][1] == "length" and rr.replicas[1].routed >= 3


def test_http_stream_ends_in_band_when_the_last_replica_dies(round_robin) -> None:
    """Over HTTP: a stream whose replica dies after its first token ends with an OpenAI-shaped error
    event and [DONE]; with no replica alive, /health is 503 and a new request a 503."""
    srv = UvicornThread(build_app(round_robin, "tiny")).start()
    try:
        body = {"model": "tiny", "prompt": "stream me", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, trust_env=False, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    ray.kill(round_robin.replicas[1].actor)  # replica 0 is dead already
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine replica 1 died" in error["message"] and error["type"]
        assert 1 <= len(events) - 2 < 200  # some tokens came before the error, not all
        health = httpx.get(srv.url + "/health", trust_env=False)
        assert health.status_code == 503
        assert [h["alive"] for h in health.json()["replicas"]] == [False, False]
        refused = httpx.post(
            srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, trust_env=False
        )
        assert (
            refused.status_code == 503 and "no engine replica is alive" in refused.json()["error"]["message"]
        )
    finally:
        srv.stop()


def test_ray_serve_application_answers(pair, tiny_llama_dir) -> None:
    """``kvsched.serve.ray_app``: deployed with ``serve.run`` on this cluster, it answers as the server."""
    import socket

    from ray import serve

    from kvsched.serve.ray_app import build_app as build_serve_app

    pair.shutdown()  # the cluster's 2 CPUs go to the application's replicas
    flags = {"model": str(tiny_llama_dir), "max_model_len": 256, "num_device_blocks": 128}
    app = build_serve_app(
        {**flags, "num_host_blocks": 0, "served_model_name": "tiny", "router": "least-loaded"}
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="kvsched", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(url + "/health", trust_env=False, timeout=30)
        assert health.status_code == 200 and len(health.json()["replicas"]) == 2
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, http_client=httpx.Client(trust_env=False)
        )
        prompt = PREFIX + "Say hello."
        want = load_tokenizer(str(tiny_llama_dir)).decode(_engine_tokens(tiny_llama_dir, {0: prompt})[0])
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].text == want
    finally:
        serve.shutdown()


def test_ray_serve_application_refuses_bad_flags() -> None:
    from kvsched.core.errors import ConfigError
    from kvsched.serve.ray_app import build_app as build_serve_app
    from kvsched.serve.ray_app import flags_from_args

    assert flags_from_args({"replicas": 3, "enable_block_reuse": "false", "priority_mode": "true"}) == [
        "--replicas", "3", "--no-enable-block-reuse", "--priority-mode"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="bad kvsched.serve.ray_app arguments"):
        build_serve_app({"router": "random"})
    # a server option is checked when the application is built, not on the Serve replica later
    with pytest.raises(ConfigError, match="tenant"):
        build_serve_app({"tenant_salt_header": "bad header"})
