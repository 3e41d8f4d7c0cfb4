"""The familiar serving-benchmark table and the JSON result file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvsched.bench.client import RequestResult
from kvsched.bench.metrics import BenchmarkMetrics, LatencyStats

_WIDTH = 50
_SECTIONS = (
    ("ttft_ms", "TTFT", "Time to First Token"),
    ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl_ms", "ITL", "Inter-token Latency"),
    ("e2el_ms", "E2EL", "End-to-end Latency"),
)


def _row(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:<10}"


def format_table(m: BenchmarkMetrics) -> str:
    lines = [
        " Serving Benchmark Result ".center(_WIDTH, "="),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
        _row("Benchmark duration (s):", m.duration_s),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
        _row("Request throughput (req/s):", m.request_throughput),
    ]
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", m.request_goodput))
    lines += [
        _row("Output token throughput (tok/s):", m.output_throughput),
        _row("Total Token throughput (tok/s):", m.total_token_throughput),
        _row("Max concurrent requests:", m.max_concurrency_seen),
    ]
    for attr, short, title in _SECTIONS:
        stats: LatencyStats = getattr(m, attr)
        lines.append(f" {title} ".center(_WIDTH, "-"))
        lines.append(_row(f"Mean {short} (ms):", stats.mean))
        lines.append(_row(f"Median {short} (ms):", stats.median))
        for key, value in stats.percentiles.items():
            lines.append(_row(f"{key.upper()} {short} (ms):", value))
    if m.per_priority:
        lines.append(" By priority (higher = more important) ".center(_WIDTH, "-"))
        for prio, pm in m.per_priority.items():
            lines.append(_row(f"Priority {prio} requests (ok/failed):", f"{pm.completed}/{pm.failed}"))
            lines.append(_row(f"Priority {prio} mean TTFT (ms):", pm.ttft_ms.mean))
            lines.append(_row(f"Priority {prio} mean E2EL (ms):", pm.e2el_ms.mean))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def result_dict(
    m: BenchmarkMetrics,
    config: dict[str, Any],
    results: Sequence[RequestResult] | None = None,
) -> dict[str, Any]:
    """Metrics plus the run's configuration; per-request rows when ``results`` is given."""
    out: dict[str, Any] = {"config": config, **m.to_dict()}
    if results is not None:
        out["requests"] = [
            {
                "success": r.success,
                "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft,
                "latency_s": r.latency,
                "itl_s": r.itl,
                "priority": r.priority,
                "error": r.error,
            }
            for r in results
        ]
    return out


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
