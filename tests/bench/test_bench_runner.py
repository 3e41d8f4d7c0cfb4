"""The load generator against a fake streaming server on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from kvsched.bench.client import RequestSpec
from kvsched.bench.datasets import DatasetConfig, build_dataset
from kvsched.bench.runner import LoadConfig, ServerUnreachableError, arrival_offsets, run_benchmark
from kvsched.bench.serve_cli import add_serve_bench_parser

MODEL = "fake-model"


def _samples(n: int, out: int = 5):
    return build_dataset(DatasetConfig(name="random", num_prompts=n, input_len=8, output_len=out))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_results_are_timed(fake_server, endpoint) -> None:
    srv, _ = fake_server
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    spec = RequestSpec(srv.url + path, MODEL, endpoint=endpoint)
    samples = build_dataset(
        DatasetConfig(name="random", num_prompts=12, input_len=8, output_len=6, range_ratio=0.5)
    )
    metrics, results = run_benchmark(spec, samples, LoadConfig(progress=False))
    assert metrics.completed == 12 and metrics.failed == 0
    assert metrics.total_output_tokens == sum(s.expected_output_len for s in samples)
    for r, s in zip(results, samples):
        assert r.output_tokens == s.expected_output_len
        assert len(r.itl) == s.expected_output_len - 1
        assert r.generated_text.split() == [f"w{i}" for i in range(s.expected_output_len)]
        assert 0 < r.ttft <= r.latency


def test_max_concurrency_is_respected(fake_server) -> None:
    srv, state = fake_server
    state.max_in_flight = 0
    spec = RequestSpec(srv.url + "/v1/completions", MODEL)
    metrics, _ = run_benchmark(spec, _samples(16, out=8), LoadConfig(max_concurrency=3, progress=False))
    assert metrics.completed == 16
    assert 1 <= state.max_in_flight <= 3


def test_unknown_model_fails_fast_or_per_request(fake_server) -> None:
    srv, _ = fake_server
    spec = RequestSpec(srv.url + "/v1/completions", "other-model")
    with pytest.raises(ServerUnreachableError, match="404"):
        run_benchmark(spec, _samples(3), LoadConfig(progress=False))
    metrics, results = run_benchmark(spec, _samples(3), LoadConfig(progress=False, initial_test=False))
    assert metrics.completed == 0 and metrics.failed == 3
    assert all("not found" in r.error for r in results)


def test_arrivals_poisson_and_trace() -> None:
    samples = _samples(200)
    assert arrival_offsets(samples, LoadConfig()) == [0.0] * 200
    offs = arrival_offsets(samples, LoadConfig(request_rate=50.0, seed=1))
    assert offs == sorted(offs) and offs[0] == 0.0
    assert 2.0 < offs[-1] < 6.0  # 199 gaps of mean 20 ms
    assert math.isinf(LoadConfig().request_rate)


def test_cli_prints_table_and_writes_json(fake_server, tmp_path, capsys) -> None:
    srv, _ = fake_server
    parser = argparse.ArgumentParser()
    add_serve_bench_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(
        f"serve --base-url {srv.url} --dataset prefix --num-prompts 8 --prefix-len 4 --random-input-len 4 "
        f"--random-output-len 3 --request-rate 200 --max-concurrency 4 --goodput ttft:60000 tpot:60000 "
        f"--result-json {out} --save-detailed --disable-tqdm".split()
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Request goodput (req/s):" in table
    data = json.loads(out.read_text())
    assert data["completed"] == 8 and data["total_output_tokens"] == 24
    assert data["config"]["model"] == MODEL  # taken from /v1/models
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert len(data["requests"]) == 8
