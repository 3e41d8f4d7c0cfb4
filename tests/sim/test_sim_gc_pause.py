"""A simulation run pauses Python's cyclic collector and gives it back as it found it."""

from __future__ import annotations

import gc

import pytest

from kvsched.core.config import CacheConfig
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload


class RecordingCost(RooflineCostModel):
    """The roofline, noting whether the cyclic collector was on at each step."""

    seen: list[bool]

    def step_time(self, shape):  # noqa: ANN001, ANN201
        self.seen.append(gc.isenabled())
        return super().step_time(shape)


def _sim(cost: RooflineCostModel) -> Simulator:
    specs = synthetic_workload(6, 50.0, LengthDist("uniform", 20, 80), LengthDist("uniform", 2, 8), seed=4)
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=64, enable_block_reuse=True)
    return Simulator(specs, cost, cache, max_batch_size=4, max_num_tokens=128, chunk_unit_size=32)


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_during_the_run_and_restored_after(restore_gc, enabled):
    cost = RecordingCost(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])
    cost.seen = []
    (gc.enable if enabled else gc.disable)()
    res = _sim(cost).run()
    assert res.summary["steps"] > 0 and cost.seen and not any(cost.seen)
    assert gc.isenabled() is enabled


def test_the_collector_is_restored_when_the_run_fails(restore_gc):
    class Failing(RooflineCostModel):
        def step_time(self, shape):  # noqa: ANN001, ANN201
            raise RuntimeError("cost model broke")

    gc.enable()
    with pytest.raises(RuntimeError, match="cost model broke"):
        _sim(Failing(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])).run()
    assert gc.isenabled()
