"""The copy term of the cost models: bytes and calls of host<->device block copies cost time, nothing
moved costs nothing, and the per-call overhead and bandwidth fit back from timed calls."""

from __future__ import annotations

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.sim.calibration import fit_copy_cost
from kvsched.sim.cost import FEATURE_NAMES, LinearCostModel, RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.storage import CountingStorage
from kvsched.sim.synthetic import LengthDist, synthetic_workload

COEF = (1e-3, 1e-5, 0.0, 1e-7, 1e-5, 1e-4)


def _decode(h2d: float = 0.0, d2h: float = 0.0, calls: int = 0) -> StepShape:
    s = StepShape()
    s.add_decode(100)
    s.h2d_bytes, s.d2h_bytes, s.copy_calls = h2d, d2h, calls
    return s


def test_linear_copy_term_grows_with_bytes_and_calls_and_is_zero_without_copies():
    m = LinearCostModel(COEF, host_link_bandwidth=1e9, copy_overhead=1e-4, overlap_copies=False, duplex=False)
    base = m.step_time(_decode())
    assert m.copy_time(_decode()) == 0.0
    assert base == pytest.approx(sum(c * f for c, f in zip(COEF, _decode().features())))
    one = m.step_time(_decode(h2d=1e6, calls=1))
    assert one == pytest.approx(base + 1e-4 + 1e-3)
    assert m.step_time(_decode(h2d=2e6, calls=1)) > one  # more bytes
    assert m.step_time(_decode(h2d=1e6, calls=3)) > one  # more calls
    # a CPU engine copies one direction after the other; a duplex link moves both at once
    both = _decode(h2d=1e6, d2h=1e6, calls=2)
    assert m.copy_time(both) == pytest.approx(2e-4 + 2e-3)
    duplex = LinearCostModel(COEF, host_link_bandwidth=1e9, copy_overhead=1e-4, duplex=True)
    assert duplex.copy_time(both) == pytest.approx(2e-4 + 1e-3)
    # overlapped copies hide under the forward until they are longer than it
    assert duplex.step_time(both) == pytest.approx(max(base, 2e-4 + 1e-3))
    with pytest.raises(ConfigError):
        LinearCostModel(COEF, host_link_bandwidth=0.0)
    with pytest.raises(ConfigError):
        LinearCostModel(COEF, copy_overhead=-1.0)


def test_roofline_copy_term():
    m = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"], overlap_copies=False)
    base = m.step_time(_decode())
    assert m.breakdown(_decode())["copy"] == 0.0
    small, large = m.step_time(_decode(h2d=1e8, calls=1)), m.step_time(_decode(h2d=4e8, calls=1))
    assert base < small < large
    assert large - base == pytest.approx(m.copy_time(4e8))


def test_fit_copy_cost_recovers_overhead_and_bandwidth():
    sizes = [4096.0 * k for k in (1, 2, 4, 8, 16, 64, 256)]
    times = [25e-6 + b / 3e9 for b in sizes]
    overhead, bandwidth = fit_copy_cost(sizes, times)
    assert overhead == pytest.approx(25e-6, rel=1e-6)
    assert bandwidth == pytest.approx(3e9, rel=1e-6)
    # no fixed cost in the data: a negative intercept is clamped, the bandwidth still fits
    overhead, bandwidth = fit_copy_cost(sizes, [b / 2e9 for b in sizes])
    assert overhead == pytest.approx(0.0, abs=1e-12) and bandwidth == pytest.approx(2e9, rel=1e-6)
    for bad in (([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([0.0, 2.0], [1.0, 1.0])):
        with pytest.raises(ConfigError):
            fit_copy_cost(*bad)


def test_counting_storage_counts_calls_that_move_blocks():
    s = CountingStorage(100)
    s.copy_blocks(0, [1, 2], 1, [3, 4])
    s.copy_blocks(1, [3], 0, [1])
    s.copy_blocks(0, [], 1, [])  # nothing moved
    s.copy_blocks(0, [1], 0, [2])  # within a tier
    assert (s.d2h_blocks, s.h2d_blocks, s.copy_calls) == (2, 1, 2)


def test_simulated_copies_cost_time_under_memory_pressure():
    specs = synthetic_workload(12, float("inf"), LengthDist("fixed", 120), LengthDist("fixed", 60), seed=2)
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=24, num_host_blocks=200)
    sched = dict(max_batch_size=8, max_num_tokens=256, chunk_unit_size=32)

    def run(overhead: float, bandwidth: float) -> dict:
        m = LinearCostModel(COEF, host_link_bandwidth=bandwidth, copy_overhead=overhead, overlap_copies=False)
        return Simulator(specs, m, cache, block_bytes=1e5, **sched).run().summary

    free, slow = run(0.0, 1e15), run(1e-3, 1e8)
    assert free["suspends"] > 0 and free["steps"] == slow["steps"]  # same decisions, copies cost more
    assert slow["busy_s"] > free["busy_s"] + free["suspends"] * 1e-3
    ample = CacheConfig(tokens_per_block=16, num_device_blocks=200, num_host_blocks=200)
    runs = [
        Simulator(specs, LinearCostModel(COEF, host_link_bandwidth=b, copy_overhead=o), ample, **sched).run()
        for o, b in ((0.0, 1e15), (1e-3, 1e8))
    ]
    assert runs[0].summary["suspends"] == 0 and runs[0].summary["busy_s"] == runs[1].summary["busy_s"]
    assert len(FEATURE_NAMES) == len(COEF)
