"""The scheduler_step benchmark script keeps working (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "scheduler_step.py"


@pytest.mark.parametrize(
    "kind,extra", [("unified", {}), ("two-stage", {"policy": "static_batch"}), ("recompute", {})]
)
def test_benchmark_runs_every_scheduler_on_a_small_batch(kind, extra):
    spec = importlib.util.spec_from_file_location("scheduler_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.run(kind, extra, 8, 3)
    assert len(figures) == 3 and all(f >= 0 for f in figures)
