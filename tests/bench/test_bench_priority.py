"""`kvsched bench serve --priority-mix`: each request carries a drawn priority; the report splits by it."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from kvsched.bench.client import RequestSpec, build_payload
from kvsched.bench.datasets import DatasetConfig, build_dataset
from kvsched.bench.serve_cli import add_serve_bench_parser
from kvsched.core.errors import ConfigError

MODEL = "fake-model"


def test_priority_mix_assigns_every_dataset_and_reaches_the_body() -> None:
    for name in ("random", "sharegpt-like", "prefix"):
        cfg = DatasetConfig(name=name, num_prompts=400, input_len=4, output_len=2, priority_mix="0:3,10:1")
        samples = build_dataset(cfg)
        counts = Counter(s.priority for s in samples)
        assert set(counts) == {0, 10} and 60 < counts[10] < 140  # ~100 of 400 at weight 1/4
        assert [s.priority for s in build_dataset(cfg)] == [s.priority for s in samples]  # seeded
    plain = build_dataset(DatasetConfig(num_prompts=3, input_len=4, output_len=2))
    assert all(s.priority is None for s in plain)
    spec = RequestSpec("http://x/v1/completions", MODEL)
    assert "priority" not in build_payload(spec, plain[0])
    assert build_payload(spec, samples[0])["priority"] == samples[0].priority
    with pytest.raises(ConfigError, match="PRIORITY:WEIGHT"):
        build_dataset(DatasetConfig(num_prompts=3, priority_mix="high:1"))


def test_cli_priority_mix_reports_each_class(fake_server, tmp_path, capsys) -> None:
    srv, state = fake_server
    state.priorities.clear()
    parser = argparse.ArgumentParser()
    add_serve_bench_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(
        f"serve --base-url {srv.url} --num-prompts 12 --random-input-len 4 --random-output-len 3 "
        f"--priority-mix 0:1,7:1 --result-json {out} --save-detailed --disable-tqdm --skip-initial-test".split()
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "By priority" in table and "Priority 7 mean TTFT (ms):" in table
    data = json.loads(out.read_text())
    sent = Counter(r["priority"] for r in data["requests"])
    assert Counter(state.priorities) == sent and set(sent) == {0, 7}
    assert list(data["per_priority"]) == ["7", "0"]  # most important first
    assert {int(k): v["completed"] for k, v in data["per_priority"].items()} == dict(sent)
    assert data["config"]["priority_mix"] == "0:1,7:1"
