"""Aggregate request results into the serving benchmark's figures (vLLM's definitions).

TTFT: request start to first content chunk. TPOT: (latency - TTFT) / (output tokens - 1), per request.
ITL: gaps between content chunks, pooled over requests. E2EL: request latency. Goodput: requests per
second that met every given SLO (milliseconds, keys ``ttft``, ``tpot``, ``e2el``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from kvsched.bench.client import RequestResult
from kvsched.core.errors import ConfigError

SLO_KEYS = ("ttft", "tpot", "e2el")


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ConfigError(f"goodput {item!r} is invalid: use KEY:MS with KEY in {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError as exc:
            raise ConfigError(f"goodput {item!r} is invalid: {value!r} is not a number") from exc
        if slos[key] <= 0:
            raise ConfigError(f"goodput {item!r} is invalid: the SLO must be > 0 ms")
    return slos


@dataclass(slots=True)
class LatencyStats:
    """Mean, median and the asked percentiles of one latency, in milliseconds."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        if len(seconds) == 0:
            return cls(percentiles={_pkey(p): 0.0 for p in percentiles})
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            percentiles={_pkey(p): float(np.percentile(ms, p)) for p in percentiles},
        )


def _pkey(p: float) -> str:
    return f"p{p:g}"


@dataclass(slots=True)
class PriorityMetrics:
    """The requests sent with one priority (``--priority-mix``): did the server favour them?"""

    completed: int
    failed: int
    ttft_ms: LatencyStats
    e2el_ms: LatencyStats


@dataclass(slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_concurrency_seen: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2el_ms: LatencyStats
    per_priority: dict[int, PriorityMetrics] = field(default_factory=dict)  # only requests sent with one

    def to_dict(self) -> dict:
        return asdict(self)


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    return all(measured[k] * 1000.0 <= v for k, v in slos.items())


def _max_overlap(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once (sweep over start/end events; O(n log n))."""
    events = sorted(
        [(r.start_time, 1) for r in results if r.success]
        + [(r.start_time + r.latency, -1) for r in results if r.success]
    )
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    *,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = (99.0,),
) -> BenchmarkMetrics:
    ok = [r for r in results if r.success]
    duration_s = max(duration_s, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    itls = [gap for r in ok for gap in r.itl]
    goodput = None
    if slos:
        goodput = sum(1 for r in ok if _meets(r, slos)) / duration_s
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        request_goodput=goodput,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        max_concurrency_seen=_max_overlap(ok),
        ttft_ms=LatencyStats.of([r.ttft for r in ok], percentiles),
        tpot_ms=LatencyStats.of([r.tpot for r in ok if r.output_tokens > 1], percentiles),
        itl_ms=LatencyStats.of(itls, percentiles),
        e2el_ms=LatencyStats.of([r.latency for r in ok], percentiles),
        per_priority=_per_priority(results, percentiles),
    )


def _per_priority(
    results: Sequence[RequestResult], percentiles: Sequence[float]
) -> dict[int, PriorityMetrics]:
    groups: dict[int, list[RequestResult]] = {}
    for r in results:
        if r.priority is not None:
            groups.setdefault(r.priority, []).append(r)
    out = {}
    for prio in sorted(groups, reverse=True):  # most important first
        ok = [r for r in groups[prio] if r.success]
        out[prio] = PriorityMetrics(
            completed=len(ok),
            failed=len(groups[prio]) - len(ok),
            ttft_ms=LatencyStats.of([r.ttft for r in ok], percentiles),
            e2el_ms=LatencyStats.of([r.latency for r in ok], percentiles),
        )
    return out
