"""The simulator drives the real scheduler exactly like a hand-written engine loop would."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.scheduler import make_scheduler
from kvsched.core.step import apply_step
from kvsched.sim.cost import RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator, decision_of, make_request
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload

COST = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
SCHED = dict(max_batch_size=8, max_num_tokens=256, chunk_unit_size=32)


def _cache(device=60, host=0, reuse=True):
    return CacheConfig(
        tokens_per_block=16, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=reuse
    )


def _workload(n=24, rate=50.0, seed=1):
    return synthetic_workload(
        n, rate, LengthDist("uniform", 20, 200), LengthDist("uniform", 2, 40), shared_prefix_len=48, seed=seed
    )


def _hand_loop(specs, cache, kind, **kw):
    """An independent engine-style loop: arrivals by time, schedule, cost, apply_step, drop finished."""
    kv = KVCacheManager(cache)
    sched = make_scheduler(kind, kv, **SCHED, **kw)
    pending = sorted(specs, key=lambda s: (s.arrival_time, s.request_id))
    by_id = {s.request_id: s for s in specs}
    active, decisions, now, step = [], [], 0.0, 0
    times = []
    while pending or active:
        while pending and pending[0].arrival_time <= now:
            s = pending.pop(0)
            active.append(make_request(s, s.arrival_time))
        if not active:
            now = pending[0].arrival_time
            continue
        out = sched.schedule(active)
        if out.is_empty:
            now = pending[0].arrival_time
            continue
        shape = StepShape()
        sampled = {}
        for r in out.context_requests:
            shape.add_context(r.context_current_position, r.context_chunk_size, r.is_last_context_chunk)
            if r.is_last_context_chunk:
                sampled[r.request_id] = [by_id[r.request_id].output_token(len(r.output_token_ids))]
        for r in out.generation_requests:
            shape.add_decode(r.num_tokens - 1)
            sampled[r.request_id] = [by_id[r.request_id].output_token(len(r.output_token_ids))]
        decisions.append(decision_of(step, out))
        step += 1
        # copies are not charged here: the shapes differ only in copy bytes, and block_bytes=0 below
        now += COST.step_time(shape)
        times.append(now)
        apply_step(out, sampled, kv, now=now)
        active = [r for r in active if not r.is_finished]
    return decisions, times


@pytest.mark.parametrize(
    ("kind", "kw", "host", "displaces"),
    [
        ("unified", {}, 200, True),
        ("unified", {}, 0, True),
        ("two-stage", {"policy": "max_utilization"}, 0, False),
        ("two-stage", {"policy": "guaranteed_no_evict"}, 0, False),
        ("recompute", {}, 0, True),
    ],
)
def test_same_decisions_as_hand_loop(kind, kw, host, displaces):
    specs = _workload()
    cache = _cache(device=60, host=host)
    sim = Simulator(specs, COST, cache, scheduler=kind, record_decisions=True, **SCHED, **kw)
    res = sim.run()
    expected, times = _hand_loop(specs, cache, kind, **kw)
    assert res.decisions == expected
    assert list(res.recorder.t_time) == pytest.approx(times, rel=1e-12)  # same step costs
    assert res.summary["requests"] == len(specs)
    busy = [d for d in res.decisions if d.paused or d.preempted]
    if displaces:
        assert busy, "the pool is small enough that the scheduler must displace requests"


def test_outputs_and_metrics_are_consistent():
    specs = _workload(n=16, rate=float("inf"))
    res = Simulator(specs, COST, _cache(device=400), **SCHED).run()
    s = res.summary
    assert s["requests"] == 16 and s["rejected"] == 0
    r = res.recorder.per_request()
    assert sorted(r["output_len"]) == sorted(sp.output_len for sp in specs)
    assert (r["ttft"] > 0).all() and (r["e2e"] >= r["ttft"]).all()
    assert s["steps"] == len(res.recorder.t_time)
    assert s["busy_s"] == pytest.approx(res.recorder.t_time[-1])  # no idle gaps when all arrive at 0
    # the shared 48-token system prompt (3 blocks) is reused by later requests
    assert s["prefix_hit_tokens_device"] >= 48
    assert 0 < s["prefix_hit_rate"] <= 48 / min(sp.prompt_len for sp in specs)
    assert len(res.recorder.itl) == sum(sp.output_len - 1 for sp in specs)


def test_host_tier_turns_recompute_into_copies():
    specs = _workload(n=30, rate=float("inf"), seed=4)
    sc = dict(block_bytes=16 * COST.kv_bytes_per_token, **SCHED)
    sim = Simulator(specs, COST, _cache(device=60, host=400, reuse=False), **sc)
    res = sim.run()
    with_host = res.summary
    sto = sim.replicas[0].storage  # the counting backend saw exactly the manager's copies
    assert (sto.d2h_blocks, sto.h2d_blocks) == (
        res.kv_stats["offload_blocks"],
        res.kv_stats["onboard_blocks"],
    )
    assert res.kv_stats["offload_bytes"] == sto.d2h_blocks * 16 * COST.kv_bytes_per_token
    recompute = (
        Simulator(specs, COST, _cache(device=60, reuse=False), scheduler="recompute", **sc).run().summary
    )
    assert with_host["suspends"] > 0 and with_host["d2h_gb"] > 0 and with_host["recomputed_tokens"] == 0
    assert recompute["preemptions"] > 0 and recompute["recomputed_tokens"] > 0


def test_too_large_request_is_rejected_and_multi_turn_children_follow_parents():
    specs = multi_turn_workload(3, 3, 10.0, LengthDist("fixed", 40), LengthDist("fixed", 8), think_time=0.5)
    res = Simulator(specs, COST, _cache(device=200), **SCHED).run()
    fin = res.recorder.finish
    assert res.summary["requests"] == 9 and res.summary["rejected"] == 0
    # turn k+1 reuses turn k's prompt and answer from the prefix cache
    assert res.summary["prefix_hit_tokens_device"] >= 6 * 32
    assert max(fin) > 2 * 0.5  # two think times at least before the last turn
    big = synthetic_workload(2, 1.0, LengthDist("fixed", 2000), LengthDist("fixed", 4))
    res = Simulator(big, COST, _cache(device=50), **SCHED).run()
    assert res.summary["rejected"] == 2 and res.summary["requests"] == 0


def test_replicas_are_independent_engines_behind_a_router():
    specs = _workload(n=30, rate=200.0, seed=7)
    cache = _cache(device=60, host=100)
    res = Simulator(
        specs, COST, cache, num_replicas=2, router="round_robin", record_decisions=True, **SCHED
    ).run()
    assert res.summary["requests"] == 30 and res.summary["replicas"] == 2
    order = sorted(specs, key=lambda s: (s.arrival_time, s.request_id))
    for k in (0, 1):
        mine = [s for i, s in enumerate(order) if i % 2 == k]  # round robin starts at replica 0
        got = [replace(d, replica=0) for d in res.decisions if d.replica == k]
        assert got == _hand_loop(mine, cache, "unified")[0]
    one = Simulator(specs, COST, cache, **SCHED).run().summary
    assert res.summary["e2e"]["mean"] < one["e2e"]["mean"]
    with pytest.raises(ConfigError):
        Simulator(specs, COST, cache, router="random")


def test_lora_page_budget_limits_adapters_per_step():
    specs = synthetic_workload(
        20,
        float("inf"),
        LengthDist("fixed", 40),
        LengthDist("fixed", 6),
        lora_ids=(1, 2, 3),
        lora_fraction=1.0,
    )
    res = Simulator(specs, COST, _cache(device=400), record_decisions=True, lora_pages=(2, 2), **SCHED).run()
    assert res.summary["requests"] == 20
    lora = {s.request_id: s.lora_id for s in specs}
    for d in res.decisions:  # 2 pages, 2 per adapter: one adapter per step
        ids = [rid for rid, _ in d.context] + list(d.generation)
        assert len({lora[i] for i in ids}) == 1
    free = Simulator(specs, COST, _cache(device=400), record_decisions=True, **SCHED).run()
    assert (
        max(len({lora[i] for i in [r for r, _ in d.context] + list(d.generation)}) for d in free.decisions)
        > 1
    )


def test_kv_events_off_changes_no_decision_or_metric():
    """The scenario turns KV events off (nobody subscribes); results must not depend on it."""
    specs = _workload(n=30, rate=float("inf"), seed=4)
    res = [
        Simulator(
            specs,
            COST,
            replace(_cache(device=60, host=200), enable_kv_events=on),
            record_decisions=True,
            **SCHED,
        ).run()
        for on in (True, False)
    ]
    assert res[0].decisions == res[1].decisions and res[0].decisions
    assert res[0].kv_stats["num_events"] > 0 and res[1].kv_stats["num_events"] == 0
    for key in (
        "steps",
        "suspends",
        "resumes",
        "prefix_hit_tokens_device",
        "prefix_hit_tokens_host",
        "busy_s",
    ):
        assert res[0].summary[key] == res[1].summary[key]
    assert list(res[0].recorder.itl) == list(res[1].recorder.itl)
