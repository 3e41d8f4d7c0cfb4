"""Closed-loop load (`max_concurrency`, as `vllm bench serve --max-concurrency`): at most N requests in
the system, the next submitted the instant one finishes, latencies counted from submission."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

COST = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
CACHE = CacheConfig(tokens_per_block=16, num_device_blocks=4000)
SCHED = dict(max_batch_size=64, max_num_tokens=2048, chunk_unit_size=64)


def _run(specs, n=None, **kw):
    sim = Simulator(specs, COST, CACHE, scheduler="unified", max_concurrency=n, **SCHED, **kw)
    res = sim.run()
    rec = res.recorder
    return res, np.asarray(rec.arrival), np.asarray(rec.first_token), np.asarray(rec.finish)


def _max_in_system(sub: np.ndarray, fin: np.ndarray) -> int:
    """Most requests between submission and finish at any instant (a finish frees its slot first)."""
    events = sorted([(t, 1) for t in sub] + [(t, -1) for t in fin], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("rate", [float("inf"), 40.0])
def test_never_more_than_n_in_the_system(rate):
    specs = synthetic_workload(40, rate, LengthDist("uniform", 50, 400), LengthDist("uniform", 4, 60), seed=3)
    res, sub, _, fin = _run(specs, n=4)
    assert res.summary["requests"] == 40
    assert _max_in_system(sub, fin) == 4
    # each submission is an arrival instant, or the instant another request finished (its slot freed)
    arrivals = np.array([s.arrival_time for s in specs])
    at_arrival = np.isclose(sub[:, None], arrivals[None, :]).any(axis=1)
    at_finish = np.isclose(sub[:, None], fin[None, :]).any(axis=1)
    assert (at_arrival | at_finish).all() and (~at_arrival).sum() >= 10
    _, sub_open, _, fin_open = _run(specs)
    assert _max_in_system(sub_open, fin_open) > 4  # the same load open-loop piles up


def test_ttft_counts_from_submission_not_arrival():
    specs = synthetic_workload(12, float("inf"), LengthDist("fixed", 1024), LengthDist("fixed", 64), seed=0)
    _, sub, first, _ = _run(specs, n=2)
    ttft = first - sub
    # two at a time: every request waits only for its own prefill next to one decoding neighbour
    assert ttft.max() < 3 * ttft.min()
    assert sub.max() > 10 * ttft.max()  # the last ones were submitted long after time 0
    _, sub_open, first_open, _ = _run(specs)
    assert (sub_open == 0).all() and (first_open - sub_open).max() > 3 * ttft.max()


def test_bad_max_concurrency_is_a_clear_error():
    specs = synthetic_workload(2, 1.0, LengthDist("fixed", 8), LengthDist("fixed", 2))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_concurrency"):
            Simulator(specs, COST, CACHE, max_concurrency=bad)
