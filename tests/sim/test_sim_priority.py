"""Priorities in the simulator: per-request priority in workloads, priority mode, per-priority metrics."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from kvsched.cli import main
from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.priority import PriorityMix
from kvsched.sim.cost import RooflineCostModel
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload
from kvsched.sim.workload import RequestSpec, unique_base, with_priorities

COST = RooflineCostModel(MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"])


def test_with_priorities_is_seeded_and_a_conversation_keeps_one_priority():
    specs = synthetic_workload(300, 10.0, LengthDist("fixed", 8), LengthDist("fixed", 2), seed=2)
    mix = PriorityMix.parse("0:2,9:1")
    a, b = with_priorities(specs, mix, seed=1), with_priorities(specs, mix, seed=1)
    assert [s.priority for s in a] == [s.priority for s in b]
    counts = Counter(s.priority for s in a)
    assert set(counts) == {0, 9} and 70 < counts[9] < 130  # ~100 of 300 at weight 1/3
    assert all(s.priority == 0 for s in specs)  # the input is not changed
    conv = with_priorities(
        multi_turn_workload(40, 3, 5.0, LengthDist("fixed", 8), LengthDist("fixed", 2), seed=3), mix, seed=4
    )
    by_id = {s.request_id: s for s in conv}
    assert all(s.priority == by_id[s.parent].priority for s in conv if s.parent is not None)
    assert len({s.priority for s in conv}) == 2
    with pytest.raises(ConfigError, match="priority=1.5 must be an integer"):
        RequestSpec(0, 0.0, ((unique_base(0), 4),), 2, priority=1.5)


def _late_high_priority(priority_mode: bool) -> Simulator:
    """Six priority-0 requests at t=0, a priority-5 one at t=0.02 s; two per batch and 12 device blocks
    (each request needs 8), so requests queue and the scheduler suspends to the host tier."""
    specs = [RequestSpec(i, 0.0, ((unique_base(i), 64),), 64) for i in range(6)]
    specs.append(RequestSpec(6, 0.02, ((unique_base(6), 64),), 64, priority=5))
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=12, num_host_blocks=64)
    sim = Simulator(specs, COST, cache, max_batch_size=2, max_num_tokens=256, priority_mode=priority_mode)
    return sim


@pytest.mark.parametrize("priority_mode", [False, True])
def test_late_high_priority_request_finishes_first_in_priority_mode(priority_mode):
    sim = _late_high_priority(priority_mode)
    result = sim.run()
    rec = sim.rec  # requests are recorded in finish order
    assert min(rec.first_token) < 0.02  # earlier requests were running when it arrived
    assert list(rec.priority) == ([5] + [0] * 6 if priority_mode else [0] * 6 + [5])
    assert list(rec.finish) == sorted(rec.finish) and len(set(rec.finish)) == 7
    assert result.summary["suspends"] > 0
    by = result.summary["by_priority"]
    assert list(by) == [5, 0] and by[5]["requests"] == 1 and by[0]["requests"] == 6
    faster = by[5]["e2e"]["mean"] < by[0]["e2e"]["mean"]
    assert faster == priority_mode


def test_one_priority_class_adds_no_breakdown():
    sim = Simulator(
        synthetic_workload(8, 50.0, LengthDist("fixed", 32), LengthDist("fixed", 4), seed=1),
        COST,
        CacheConfig(tokens_per_block=16, num_device_blocks=64),
        max_batch_size=4,
    )
    assert "by_priority" not in sim.run().summary


def test_cli_priority_mix_and_mode(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(
        ["sim", "--synthetic", "--num-requests", "40", "--rate", "200", "--prompt-len", "fixed:256",
         "--output-len", "fixed:32", "--model", "llama-3.1-8b", "--gpu", "h200", "--num-device-blocks", "40",
         "--tokens-per-block", "16", "--max-batch-size", "4", "--host-memory-gb", "1",
         "--policies", "unified,two-stage", "--priority-mode", "--priority-mix", "0:3,10:1",
         "--json", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("priority   10:") == 2 and text.count("priority    0:") == 2
    runs = json.loads(out.read_text())["runs"]
    for run in runs:
        by = run["by_priority"]
        assert set(by) == {"10", "0"} and by["10"]["requests"] + by["0"]["requests"] == 40
        assert by["10"]["ttft"]["mean"] < by["0"]["ttft"]["mean"]
    assert main(["sim", "--synthetic", "--priority-mix", "urgent", "--no-progress"]) == 2
    assert "PRIORITY:WEIGHT" in capsys.readouterr().err
