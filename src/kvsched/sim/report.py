"""Comparison table and JSON of several simulated runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvsched.sim.simulator import SimResult

# (header, key path, format)
_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("req/s", ("request_throughput",), "{:.2f}"),
    ("tok/s", ("output_token_throughput",), "{:.0f}"),
    ("goodput", ("goodput",), "{:.2f}"),
    ("SLO%", ("slo_attainment",), "{:.0%}"),
    ("TTFT p50", ("ttft", "p50"), "{:.3f}"),
    ("TTFT p99", ("ttft", "p99"), "{:.3f}"),
    ("TPOT p50", ("tpot", "p50"), "{:.4f}"),
    ("TPOT p99", ("tpot", "p99"), "{:.4f}"),
    ("E2E p99", ("e2e", "p99"), "{:.2f}"),
    ("susp", ("suspends",), "{}"),
    ("preempt", ("preemptions",), "{}"),
    ("recomp tok", ("recomputed_tokens",), "{}"),
    ("hit%", ("prefix_hit_rate",), "{:.0%}"),
    ("d2h GB", ("d2h_gb",), "{:.1f}"),
    ("h2d GB", ("h2d_gb",), "{:.1f}"),
    ("steps", ("steps",), "{}"),
    ("steps/s", ("sim_steps_per_s",), "{:.0f}"),
)


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    v: Any = summary
    for k in path:
        v = v[k]
    return v


def comparison_table(results: Sequence[SimResult]) -> str:
    """A fixed-width table, one row per run (latencies in seconds)."""
    headers = ["policy"] + [c[0] for c in _COLUMNS]
    rows = [[r.name] + [fmt.format(_get(r.summary, path)) for _, path, fmt in _COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def ratio_lines(results: Sequence[SimResult], baseline: str = "oracle") -> list[str]:
    """Goodput and p99 TPOT of each run relative to `baseline` (usually the unlimited-KV oracle)."""
    base = next((r for r in results if r.name == baseline), None)
    if base is None:
        return []
    g0, t0 = base.summary["goodput"], base.summary["tpot"]["p99"]
    lines = []
    for r in results:
        if r is base:
            continue
        # A zero baseline (e.g. no request met the SLOs even with unlimited KV) has no ratio.
        g = f"{r.summary['goodput'] / g0:6.3f}" if g0 else "   n/a"
        t = f"{r.summary['tpot']['p99'] / t0:6.3f}" if t0 else "   n/a"
        lines.append(f"{r.name:32s} goodput/oracle {g}   p99 TPOT/oracle {t}")
    return lines


def priority_lines(results: Sequence[SimResult]) -> list[str]:
    """TTFT and E2E per priority class (higher = more important) of each run with several classes."""
    lines = []
    for r in results:
        for prio, s in r.summary.get("by_priority", {}).items():
            lines.append(
                f"{r.name:32s} priority {prio:>4}: {s['requests']:6d} req  TTFT p50 {s['ttft']['p50']:.3f} "
                f"p99 {s['ttft']['p99']:.3f}  E2E p99 {s['e2e']['p99']:.2f}"
            )
    return lines


def write_json(path: str | Path, results: Sequence[SimResult], meta: dict[str, Any]) -> None:
    data = {"meta": meta, "runs": [{"policy": r.name, **r.summary, "kv_stats": r.kv_stats} for r in results]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=float))
