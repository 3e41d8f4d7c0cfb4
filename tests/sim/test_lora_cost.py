"""LoRA in the simulator's cost: adapter FLOPs and weight reads by hand, loads once per device residency."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.sim.cli import add_parser, build_scenario
from kvsched.sim.cost import RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.lora import LoraSpec
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

LLAMA8 = MODEL_PRESETS["llama-3.1-8b"]
IDEAL_H200 = GPU_PRESETS["h200"].with_efficiency(
    mfu=1.0, hbm_efficiency=1.0, attention_efficiency=1.0, host_link_efficiency=1.0
)
# rank 8 on q (4096 -> 4096) and v (4096 -> 1024): 8 * (8192 + 5120) = 106_496 parameters per layer
RANK8_QV = LoraSpec(rank=8, targets=("q", "v"))
PARAMS = 106_496 * 32
BYTES = PARAMS * 2  # BF16
FLOPS_PER_TOKEN = 2 * PARAMS


def _models():
    base = RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=0.0)
    return base, RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=0.0, lora=RANK8_QV)


def test_adapter_size_matches_hand_computation():
    assert RANK8_QV.params_per_layer(LLAMA8) == 106_496
    assert RANK8_QV.adapter_bytes(LLAMA8) == BYTES == 6_815_744
    assert RANK8_QV.flops_per_token(LLAMA8) == FLOPS_PER_TOKEN
    full = LoraSpec(rank=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert full.params_per_layer(LLAMA8) == layer


def test_decode_with_lora_costs_one_adapter_read_more():
    base, lora = _models()
    s = StepShape()
    s.add_decode(kv_len=1023)
    plain = base.step_time(s)
    assert lora.step_time(s) == pytest.approx(plain)  # no adapter tokens: nothing extra
    s.lora_tokens, s.lora_adapters = 1, 1
    # one token: the adapter's bytes dominate its FLOPs (memory-bound)
    assert lora.step_time(s) - plain == pytest.approx(BYTES / 4.8e12)
    assert lora.breakdown(s)["lora"] == pytest.approx(BYTES / 4.8e12)
    assert base.step_time(s) == pytest.approx(plain)  # without a LoraSpec the adapters cost nothing


def test_prefill_with_lora_costs_its_flops():
    base, lora = _models()
    s = StepShape()
    s.add_context(0, 4096, last=True)
    s.lora_tokens, s.lora_adapters = 4096, 1
    extra = lora.step_time(s) - base.step_time(s)
    assert extra == pytest.approx(4096 * FLOPS_PER_TOKEN / 989e12)  # compute-bound: ~28 us
    assert extra > BYTES / 4.8e12


def test_more_distinct_adapters_read_more_weights_for_the_same_tokens():
    _, lora = _models()
    times = []
    for adapters in (1, 4, 16):
        s = StepShape()
        for _ in range(16):
            s.add_decode(kv_len=511)
        s.lora_tokens, s.lora_adapters = 16, adapters
        times.append(lora.step_time(s))
    assert times[1] - times[0] == pytest.approx(3 * BYTES / 4.8e12)
    assert times[2] - times[1] == pytest.approx(12 * BYTES / 4.8e12)


def test_adapter_load_is_a_serial_host_to_device_copy():
    _, lora = _models()
    s = StepShape()
    s.add_decode(kv_len=1023)
    s.lora_tokens, s.lora_adapters = 1, 1
    before = lora.step_time(s)
    s.lora_load_bytes = lora.lora_adapter_bytes
    assert lora.lora_adapter_bytes == BYTES
    # the forward waits for its adapter: added even though KV copies overlap with compute
    assert lora.step_time(s) - before == pytest.approx(BYTES / 64e9)


@dataclass
class _Recording:
    """The roofline, keeping each step's adapter load bytes and distinct adapters."""

    inner: RooflineCostModel
    loads: list[float] = field(default_factory=list)
    adapters: list[int] = field(default_factory=list)

    @property
    def lora_adapter_bytes(self) -> float:
        return self.inner.lora_adapter_bytes

    def step_time(self, shape: StepShape) -> float:
        self.loads.append(shape.lora_load_bytes)
        self.adapters.append(shape.lora_adapters)
        return self.inner.step_time(shape)


def _lora_specs():
    return synthetic_workload(
        20,
        50.0,  # staggered arrivals: adapters come back after an eviction
        LengthDist("fixed", 40),
        LengthDist("fixed", 6),
        lora_ids=(1, 2, 3),
        lora_fraction=1.0,
    )


def _run(lora_pages):
    cost = _Recording(RooflineCostModel(LLAMA8, GPU_PRESETS["h200"], lora=RANK8_QV))
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=400)
    sched = dict(max_batch_size=8, max_num_tokens=256, chunk_unit_size=32)
    specs = _lora_specs()
    res = Simulator(specs, cost, cache, record_decisions=True, lora_pages=lora_pages, **sched).run()
    assert res.summary["requests"] == 20
    return specs, res, cost


def test_each_adapter_loads_once_when_all_fit():
    _, res, cost = _run(None)
    assert res.summary["lora_loads"] == 3
    assert sum(cost.loads) == pytest.approx(3 * BYTES)
    assert max(cost.adapters) > 1  # several adapters share steps


def test_load_is_charged_once_per_residency_under_a_page_budget():
    specs, res, cost = _run((2, 2))  # room for one adapter: switching adapters evicts the previous one
    lora = {s.request_id: s.lora_id for s in specs}
    previous, expected = None, []
    for d in res.decisions:
        (adapter,) = {lora[i] for i in [rid for rid, _ in d.context] + list(d.generation)}
        expected.append(BYTES if adapter != previous else 0.0)
        previous = adapter
    assert cost.loads == pytest.approx(expected)
    switches = sum(1 for b in expected if b)
    assert res.summary["lora_loads"] == switches > 3  # reloaded after an eviction, once per residency


def test_base_requests_report_no_loads():
    specs = synthetic_workload(8, float("inf"), LengthDist("fixed", 40), LengthDist("fixed", 4))
    cost = RooflineCostModel(LLAMA8, GPU_PRESETS["h200"], lora=RANK8_QV)
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=100)
    res = Simulator(specs, cost, cache, max_batch_size=8, max_num_tokens=256, chunk_unit_size=32).run()
    assert "lora_loads" not in res.summary


def test_bad_lora_options_are_refused():
    with pytest.raises(ConfigError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ConfigError, match="lm_head"):
        LoraSpec(targets=("q", "lm_head"))
    with pytest.raises(ConfigError, match="empty"):
        LoraSpec(targets=())


def test_cli_options_reach_the_cost_model():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    a = parser.parse_args(["sim", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj"])
    sc = build_scenario(a)
    assert sc.lora == RANK8_QV
    assert sc.cost_model().lora_adapter_bytes == BYTES
