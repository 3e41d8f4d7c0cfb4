"""Aggregation: TPOT, ITL pooling, percentiles, goodput, parsing of SLOs."""

from __future__ import annotations

import pytest

from kvsched.bench.client import RequestResult
from kvsched.bench.metrics import compute_metrics, parse_goodput
from kvsched.bench.report import format_table, result_dict
from kvsched.core.errors import ConfigError


def _res(ttft: float, latency: float, n: int, start: float = 0.0) -> RequestResult:
    gaps = [(latency - ttft) / (n - 1)] * (n - 1) if n > 1 else []
    return RequestResult(True, 10, n, ttft, latency, gaps, start)


def test_metrics_definitions() -> None:
    results = [_res(0.1, 1.1, 11), _res(0.3, 2.3, 5, start=0.5), RequestResult(error="HTTP 500")]
    m = compute_metrics(results, 4.0, slos={"ttft": 200.0}, percentiles=(50, 99))
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (20, 16)
    assert m.request_throughput == pytest.approx(0.5)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.tpot_ms.mean == pytest.approx((100.0 + 500.0) / 2)  # per request, then averaged
    assert m.itl_ms.mean == pytest.approx((10 * 100.0 + 4 * 500.0) / 14)  # pooled gaps
    assert m.e2el_ms.percentiles["p50"] == pytest.approx(1700.0)
    assert m.request_goodput == pytest.approx(0.25)  # only the first meets ttft <= 200 ms
    assert m.max_concurrency_seen == 2
    table = format_table(m)
    assert "Successful requests:" in table and "P99 TTFT (ms):" in table and "Request goodput" in table
    assert result_dict(m, {"x": 1}, results)["requests"][2]["error"] == "HTTP 500"


def test_no_success_gives_zeros_not_errors() -> None:
    m = compute_metrics([RequestResult(error="x")], 1.0)
    assert m.completed == 0 and m.ttft_ms.mean == 0.0 and m.request_goodput is None


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:1e4"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 1e4}
    for bad in (["ttft"], ["foo:1"], ["ttft:abc"], ["tpot:-1"]):
        with pytest.raises(ConfigError):
            parse_goodput(bad)
