"""Prompt sets: lengths, shared prefixes, trace parsing, bad input."""

from __future__ import annotations

import json

import pytest

from kvsched.bench.datasets import DatasetConfig, build_dataset
from kvsched.core.errors import ConfigError


def test_random_lengths_follow_range_ratio() -> None:
    cfg = DatasetConfig(name="random", num_prompts=50, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    samples = build_dataset(cfg)
    assert len(samples) == 50
    for s in samples:
        assert 20 <= s.prompt_len <= 60 and 5 <= s.expected_output_len <= 15
        assert len(s.prompt.split()) == s.prompt_len
    assert len({s.prompt_len for s in samples}) > 1
    assert build_dataset(cfg) == samples  # deterministic for a seed


def test_token_ids_format_is_exact() -> None:
    cfg = DatasetConfig(name="random", num_prompts=5, input_len=17, prompt_format="token-ids", vocab_size=500)
    for s in build_dataset(cfg):
        assert isinstance(s.prompt, list) and len(s.prompt) == 17
        assert all(100 <= t < 500 for t in s.prompt)


def test_prefix_dataset_shares_prefixes_by_group() -> None:
    cfg = DatasetConfig(name="prefix", num_prompts=6, prefix_len=8, num_prefixes=2, input_len=4)
    samples = build_dataset(cfg)
    heads = [s.prompt.split()[:8] for s in samples]
    assert heads[0] == heads[2] == heads[4] and heads[1] == heads[3]
    assert heads[0] != heads[1]
    assert all(s.prompt_len == 12 for s in samples)


def test_sharegpt_like_respects_caps() -> None:
    cfg = DatasetConfig(name="sharegpt-like", num_prompts=200, max_input_len=64, max_output_len=32)
    samples = build_dataset(cfg)
    assert max(s.prompt_len for s in samples) <= 64 and max(s.expected_output_len for s in samples) <= 32
    assert min(s.prompt_len for s in samples) >= 4


def _write_trace(tmp_path, records):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_mooncake_shares_blocks_and_scales(tmp_path) -> None:
    path = _write_trace(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 1000, "output_length": 100, "hash_ids": [0, 1]},
            {"timestamp": 1500, "input_length": 700, "output_length": 7, "hash_ids": [0, 2]},
            {"timestamp": 3000, "input_length": 10, "output_length": 1, "hash_ids": [9]},
        ],
    )
    cfg = DatasetConfig(name="mooncake", num_prompts=2, trace_path=path, length_scale=1 / 32)
    a, b = build_dataset(cfg)
    assert (a.prompt_len, a.expected_output_len) == (32, 4)
    assert (b.prompt_len, b.expected_output_len) == (22, 1)
    assert a.prompt.split()[:16] == b.prompt.split()[:16]  # block 0 (512 / 32 = 16 units) is shared
    assert a.prompt.split()[16:22] != b.prompt.split()[16:22]
    assert (a.arrival_s, b.arrival_s) == (0.0, 1.5)


def test_mooncake_bad_inputs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="trace-path"):
        build_dataset(DatasetConfig(name="mooncake"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        build_dataset(DatasetConfig(name="mooncake", trace_path=str(bad)))
    with pytest.raises(ConfigError, match="dataset"):
        build_dataset(DatasetConfig(name="nope"))
    with pytest.raises(ConfigError):
        DatasetConfig(num_prompts=0)
