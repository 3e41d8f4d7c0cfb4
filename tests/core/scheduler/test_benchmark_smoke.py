"""The scheduler_step benchmark script keeps working (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "scheduler_step.py"


@pytest.mark.parametrize(
    "kind,extra", [("unified", {}), ("two-stage", {"policy": "static_batch"}), ("recompute", {})]
)
def test_benchmark_runs_every_scheduler_on_a_small_batch(kind, extra):
    figures = _load().run(kind, extra, 8, 3)
    assert len(figures) == 3 and all(f >= 0 for f in figures)


def _load():
    spec = importlib.util.spec_from_file_location("scheduler_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_vllm_side_by_side_without_vllm_says_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed
    bench = _load()
    monkeypatch.setattr(
        sys, "argv", ["scheduler_step.py", "--sizes", "8", "--steps", "2", "--vllm-size", "8"]
    )
    bench.main()
    out = capsys.readouterr().out
    assert "side-by-side skipped" in out
    assert "vLLM / kvsched" not in out
    rows = [line for line in out.splitlines() if line.startswith(("unified", "recompute", "two-stage"))]
    assert len(rows) == 4


def test_vllm_side_by_side_runs_the_same_decode_work():
    pytest.importorskip("vllm")  # only where vLLM is installed (see the script's docstring)
    figures = _load().vllm_step(8, 3)
    assert figures is not None, "vLLM importable but its Scheduler could not be driven"
    assert len(figures) == 3 and all(f > 0 for f in figures)
