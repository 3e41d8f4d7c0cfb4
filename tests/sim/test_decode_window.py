"""Decode windows (sim/decode_window.py) change nothing: runs with windows on and off are identical.

Same summary, same per-request and per-step records, same decisions, for every scheduler, under memory
pressure (suspends, preemptions, host-tier copies), with prefix reuse and vocab-mapped tokens, with several
replicas, conversation turns (a finish creates an arrival) and a closed loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.core.config import CacheConfig
from kvsched.sim import decode_window, replica
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload

COST = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
SCHED = dict(max_batch_size=8, max_num_tokens=256, chunk_unit_size=32)
POLICIES = [
    ("unified", {}),
    ("two-stage", {"policy": "max_utilization"}),
    ("two-stage", {"policy": "guaranteed_no_evict"}),
    ("recompute", {}),
]


def _cache(device: int, host: int) -> CacheConfig:
    return CacheConfig(
        tokens_per_block=16, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=True
    )


def _run(specs, cache, kind, kw, windows, **sim_kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    sim = Simulator(
        specs, COST, cache, scheduler=kind, block_bytes=4096.0, record_decisions=True, **SCHED, **kw, **sim_kw
    )
    for rep in sim.replicas:
        rep.decode_windows = windows
    return sim.run()


def _same(a, b, exact: bool) -> None:  # noqa: ANN001
    """Equal results; with several replicas the shared records interleave differently, so compare them
    per replica (decisions) and as sorted samples (the summary then agrees to rounding of the means)."""
    skip = {"wall_s", "cpu_s", "sim_steps_per_s"}
    sa = {k: v for k, v in a.summary.items() if k not in skip}
    sb = {k: v for k, v in b.summary.items() if k not in skip}
    if exact:
        assert sa == sb
        assert a.decisions == b.decisions
        assert list(a.recorder.itl) == list(b.recorder.itl)
        for key, col in a.recorder.timeline().items():
            assert np.array_equal(col, b.recorder.timeline()[key]), key
        for key, col in a.recorder.per_request().items():
            assert np.array_equal(col, b.recorder.per_request()[key]), key
        return
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], str):  # e.g. the router's name
            assert sa[key] == sb[key], key
        else:
            assert sa[key] == pytest.approx(sb[key], rel=1e-9), key
    for rep in {d.replica for d in a.decisions}:
        assert [d for d in a.decisions if d.replica == rep] == [d for d in b.decisions if d.replica == rep]
    assert sorted(a.recorder.itl) == sorted(b.recorder.itl)
    for key in ("arrival", "first_token", "finish"):
        assert sorted(getattr(a.recorder, key)) == sorted(getattr(b.recorder, key))


def _count_windows(monkeypatch) -> dict[str, int]:  # noqa: ANN001
    """Count the windows replicas run (``run_window`` not None) and the new blocks they take."""
    ran = {"windows": 0, "grows": 0}
    run_window, grow = decode_window.run_window, decode_window._grow

    def counted_run(*args):  # noqa: ANN002, ANN202
        finished = run_window(*args)
        ran["windows"] += finished is not None
        return finished

    def counted_grow(*args):  # noqa: ANN002, ANN202
        ran["grows"] += 1
        return grow(*args)

    monkeypatch.setattr(replica, "run_window", counted_run)
    monkeypatch.setattr(decode_window, "_grow", counted_grow)
    return ran


@pytest.mark.parametrize(("kind", "kw"), POLICIES)
def test_windows_change_nothing_under_memory_pressure(kind, kw, monkeypatch):
    specs = synthetic_workload(
        30, 20.0, LengthDist("uniform", 20, 300), LengthDist("uniform", 2, 120), shared_prefix_len=48,
        num_shared_prefixes=3, seed=4, vocab_size=1000,
    )  # fmt: skip
    host = 0 if kind != "unified" else 400
    ran = _count_windows(monkeypatch)
    on = _run(specs, _cache(60, host), kind, kw, True)
    # windows did run here, and took new blocks inside (else "identical" would prove nothing)
    assert ran["windows"] > 0 and ran["grows"] > 0
    off = _run(specs, _cache(60, host), kind, kw, False)
    _same(on, off, exact=True)
    # the pool was tight enough to displace requests (guaranteed_no_evict never does: it waits)
    displaced = on.summary["suspends"] + on.summary["preemptions"]
    assert displaced > 0 if kw.get("policy") != "guaranteed_no_evict" else displaced == 0
    assert on.summary["steps"] > 100


def test_windows_run_many_steps_per_call():
    specs = synthetic_workload(8, float("inf"), LengthDist("fixed", 40), LengthDist("fixed", 200), seed=1)
    sim = Simulator(specs, COST, _cache(400, 0), **SCHED)
    calls = 0
    step = sim.replicas[0].step

    def counted():  # noqa: ANN202
        nonlocal calls
        calls += 1
        return step()

    sim.replicas[0].step = counted  # type: ignore[method-assign]
    res = sim.run()
    assert res.summary["steps"] == 2 + 199  # two prefill steps (256-token budget), then 199 decodes
    assert calls < res.summary["steps"] / 4


@pytest.mark.parametrize("router", ["least_loaded", "round_robin"])
def test_windows_with_replicas_conversations_and_a_closed_loop(router):
    conv = multi_turn_workload(
        10, 3, 30.0, LengthDist("uniform", 10, 120), LengthDist("uniform", 5, 80), think_time=0.05,
        system_prompt_len=40, seed=2,
    )  # fmt: skip
    flat = synthetic_workload(40, 60.0, LengthDist("uniform", 20, 200), LengthDist("uniform", 2, 90), seed=5)
    for specs, extra in ((conv, {}), (flat, {"max_concurrency": 6}), (flat, {})):
        runs = [
            _run(specs, _cache(80, 200), "unified", {}, w, num_replicas=3, router=router, **extra)
            for w in (True, False)
        ]
        _same(*runs, exact=False)
