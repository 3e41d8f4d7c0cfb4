"""The simulator's routers are the core's (kvsched.core.routing): kv_aware fed by the replicas' KV events."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.routing import KVAwareRouter, prompt_keys
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.replica import make_request
from kvsched.sim.routing import SimRouter
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload

COST = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
SCHED = dict(max_batch_size=8, max_num_tokens=512, chunk_unit_size=32)


def _cache(device):
    return CacheConfig(
        tokens_per_block=16, num_device_blocks=device, enable_block_reuse=True, enable_kv_events=False
    )


def _shared_prefixes():
    """8 system prompts of 256 tokens; a replica's pool holds about two of them with their requests."""
    return synthetic_workload(
        160,
        20.0,
        LengthDist("fixed", 16),
        LengthDist("fixed", 4),
        shared_prefix_len=256,
        num_shared_prefixes=8,
        seed=3,
    )


def _hits(res):
    return res.kv_stats["reuse_hit_tokens_device"] + res.kv_stats["reuse_hit_tokens_host"]


def test_kv_aware_reuses_more_prefix_than_round_robin_and_least_loaded():
    specs = _shared_prefixes()
    runs = {
        router: Simulator(specs, COST, _cache(48), num_replicas=4, router=router, **SCHED).run()
        for router in ("round_robin", "least_loaded", "kv-aware")
    }
    assert all(r.summary["requests"] == 160 for r in runs.values())
    kv = runs["kv-aware"]
    # the managers' own counters: tokens found cached at admission
    assert _hits(kv) > 1.3 * _hits(runs["round_robin"])
    assert _hits(kv) > 1.3 * _hits(runs["least_loaded"])
    assert kv.summary["prefix_hit_rate"] > runs["round_robin"].summary["prefix_hit_rate"]
    # events are turned on only for the router that reads them
    assert kv.kv_stats["num_events"] > 0 and runs["round_robin"].kv_stats["num_events"] == 0


def test_kv_aware_index_follows_the_replicas_caches():
    specs = _shared_prefixes()[:40]
    sim = Simulator(specs, COST, _cache(48), num_replicas=2, router="kv_aware", **SCHED)
    sim.run()
    router = sim.routing.router
    assert isinstance(router, KVAwareRouter)
    for rep in sim.replicas:
        assert rep.kv.drain_events() == []  # every event went to the router
        cached = rep.kv.stats()
        held = cached.cached_device_blocks + cached.used_device_blocks
        assert 0 < router.index.num_blocks(rep.index) <= held


def test_the_routers_index_equals_every_replicas_cache_at_each_arrival(monkeypatch):
    """Keys from the sim's prompt tokens equal the replicas' event hashes: at each arrival, the index's
    match (device + host, no predictions) is exactly what each replica's manager would reuse."""
    specs = _shared_prefixes()[:80]
    cache = CacheConfig(
        tokens_per_block=16, num_device_blocks=48, num_host_blocks=64, enable_block_reuse=True
    )
    sim = Simulator(specs, COST, cache, num_replicas=3, router="kv_aware", **SCHED)
    index = sim.routing.router.index
    checked = []
    original = SimRouter.route

    def route(self, spec):
        keys = prompt_keys(spec.prompt_tokens(), 16, lora_id=spec.lora_id)
        hits = index.match(keys)
        for rep in sim.replicas:
            dev, host = hits.get(rep.index, (0, 0))
            assert (dev + host) * 16 == rep.kv.probe_reuse(make_request(spec, 0.0))
            checked.append(dev + host)
        return original(self, spec)

    monkeypatch.setattr(SimRouter, "route", route)
    assert sim.run().summary["requests"] == 80
    assert len(checked) == 240 and sum(checked) > 0


@pytest.mark.parametrize("router", ["sticky", "kv_aware"])
def test_conversations_stay_on_one_replica(router):
    specs = multi_turn_workload(12, 3, 20.0, LengthDist("fixed", 40), LengthDist("fixed", 4), think_time=0.05)
    res = Simulator(
        specs, COST, _cache(400), num_replicas=3, router=router, record_decisions=True, **SCHED
    ).run()
    where = {}
    for d in res.decisions:
        for rid, _ in d.context:
            where.setdefault(rid, set()).add(d.replica)
    root = {}
    for s in sorted(specs, key=lambda s: s.request_id):
        root[s.request_id] = s.request_id if s.parent is None else root[s.parent]
    by_conv = {}
    for rid, reps in where.items():
        by_conv.setdefault(root[rid], set()).update(reps)
    assert len(by_conv) == 12 and all(len(r) == 1 for r in by_conv.values())
    assert len(set().union(*by_conv.values())) > 1  # first turns were spread


def test_bad_router_is_a_config_error():
    with pytest.raises(ConfigError, match="router='random' is unknown"):
        Simulator(_shared_prefixes(), COST, _cache(48), router="random")


def test_cli_router_kv_aware(tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = main(
        ["sim", "--num-requests", "12", "--time-scale", "0.2", "--num-device-blocks", "4000",
         "--replicas", "2", "--router", "kv-aware", "--policies", "unified", "--json", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["requests"] == 12 and run["replicas"] == 2 and run["kv_stats"]["num_events"] > 0
    assert (
        run["router"] == "kv_aware" and "2 x 1 x h200 behind the kv_aware router" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        main(["sim", "--router", "fastest", "--no-progress"])
    assert "router='fastest' is unknown: one of round_robin" in capsys.readouterr().err
