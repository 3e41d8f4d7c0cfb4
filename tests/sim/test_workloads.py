"""Trace loader (block sharing preserved at any block size) and synthetic generators."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from kvsched.core.errors import ConfigError
from kvsched.sim.synthetic import (
    LengthDist,
    arrival_times,
    long_prompt_workload,
    multi_turn_workload,
    synthetic_workload,
)
from kvsched.sim.trace import default_trace, iter_mooncake, load_mooncake
from kvsched.sim.workload import RequestSpec, time_scaled, workload_summary


def _write(tmp_path, records):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return p


def _blocks(tokens, tpb):
    return [tuple(tokens[i : i + tpb]) for i in range(0, len(tokens) - len(tokens) % tpb, tpb)]


def test_shared_hash_ids_share_every_small_block(tmp_path):
    recs = [
        {"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [7, 10]},
        {"timestamp": 2500, "input_length": 1030, "output_length": 2, "hash_ids": [7, 8, 11]},
    ]
    a, b, c = load_mooncake(_write(tmp_path, recs))
    assert [s.arrival_time for s in (a, b, c)] == [0.0, 0.5, 1.5]
    ta, tb, tc = a.prompt_tokens(), b.prompt_tokens(), c.prompt_tokens()
    assert (len(ta), len(tb), len(tc)) == (1100, 600, 1030)
    for tpb in (16, 64, 512):
        ba, bb, bc = _blocks(ta, tpb), _blocks(tb, tpb), _blocks(tc, tpb)
        per = 512 // tpb
        assert ba[:per] == bb[:per] and ta[512:600] != tb[512:600]  # share block 7 only
        assert ba[: 2 * per] == bc[: 2 * per] and ta[1024:1030] != tc[1024:1030]  # share 7 and 8
    # each hash block starts with its own tag and nothing else reaches the tag range: with chained
    # block keys, blocks after a differing tag can never match another prompt's (workload.py)
    assert [i for i, t in enumerate(ta) if t >= 256] == [0, 512, 1024]
    assert len({ta[0], ta[512], ta[1024], tb[512], tc[1024]}) == 5


def test_real_trace_slice_reuse_structure():
    specs = load_mooncake(limit=50)  # the shipped Mooncake conversation trace
    assert len(specs) == 50 and specs[0].prompt_len == 6758 and specs[0].output_len == 500
    firsts = {s.prompt_tokens()[0] for s in specs[:5]}
    assert len(firsts) == 1  # the trace's first five requests all start with hash id 0
    later = load_mooncake(start=10, limit=5)
    assert later[0].arrival_time == 0.0 and later[0].request_id == 10


def test_shipped_trace_is_the_whole_compressed_conversation_trace():
    res = default_trace()
    with res.open("rb") as fh:
        raw = fh.read()
    assert raw[:2] == b"\x1f\x8b" and len(raw) < 2 << 20  # gzip, well under 2 MiB in the wheel
    specs = list(iter_mooncake())
    assert len(specs) == 12031
    assert [s.request_id for s in specs] == list(range(12031))
    last = specs[-1]
    assert (last.prompt_len, last.output_len, last.arrival_time) == (20774, 508, 3536.999)
    assert last.segments[0] == (0, 512)  # hash id 0: the prefix most conversations share
    mean_in = sum(s.prompt_len for s in specs) / len(specs)
    assert round(mean_in) == 12035  # the published mean input length


def test_user_trace_plain_or_gzip_reads_the_same(tmp_path):
    recs = [
        {"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [3, 4]},
        {"timestamp": 250, "input_length": 100, "output_length": 1, "hash_ids": [3]},
    ]
    plain = _write(tmp_path, recs)
    packed = tmp_path / "t.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_mooncake(packed) == load_mooncake(str(plain))
    assert [s.prompt_len for s in load_mooncake(packed)] == [600, 100]


def test_bad_trace_records(tmp_path):
    with pytest.raises(ConfigError, match="do not cover"):
        load_mooncake(
            _write(tmp_path, [{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1]}])
        )
    with pytest.raises(ConfigError, match=":1:"):
        load_mooncake(_write(tmp_path, [{"timestamp": 0, "input_length": 5}]))
    with pytest.raises(ConfigError, match="does not exist"):
        load_mooncake(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl.gz"
    good = json.dumps({"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": [1]}) + "\n"
    packed = gzip.compress(good.encode() * 2000)
    broken.write_bytes(packed[: len(packed) // 2])  # a download cut short
    with pytest.raises(ConfigError, match="broken.jsonl.gz: cannot read the trace"):
        load_mooncake(broken)
    with pytest.raises(ConfigError, match="must not be negative"):
        load_mooncake(start=-1)


def test_synthetic_lengths_arrivals_and_prefixes():
    specs = synthetic_workload(
        400,
        rate=10.0,
        prompt_len=LengthDist.parse("lognormal:200:0.5"),
        output_len=LengthDist.parse("uniform:4:8"),
        shared_prefix_len=32,
        num_shared_prefixes=2,
        lora_ids=(1, 2),
        lora_fraction=0.5,
        seed=3,
    )
    t = np.array([s.arrival_time for s in specs])
    assert t[0] == 0.0 and (np.diff(t) >= 0).all()
    assert 399 / t[-1] == pytest.approx(10.0, rel=0.2)
    assert all(4 <= s.output_len <= 8 for s in specs)
    mean = np.mean([s.prompt_len - 32 for s in specs])
    assert mean == pytest.approx(200, rel=0.1)
    heads = {tuple(s.prompt_tokens()[:32]) for s in specs}
    assert len(heads) == 2
    assert {s.lora_id for s in specs} == {None, 1, 2}
    again = synthetic_workload(
        400,
        10.0,
        LengthDist.parse("lognormal:200:0.5"),
        LengthDist.parse("uniform:4:8"),
        shared_prefix_len=32,
        num_shared_prefixes=2,
        lora_ids=(1, 2),
        lora_fraction=0.5,
        seed=3,
    )
    assert [s.prompt_tokens() for s in again] == [s.prompt_tokens() for s in specs]


def test_gamma_burstier_than_poisson_and_errors():
    rng = np.random.default_rng(0)
    g = np.diff(arrival_times(5000, 5.0, rng, process="gamma", cv=3.0))
    assert g.std() / g.mean() > 2.0
    assert (arrival_times(3, float("inf"), rng) == 0).all()
    for bad in ("fixed", "weird:3", "uniform:9:2", "fixed:x"):
        with pytest.raises(ConfigError):
            LengthDist.parse(bad)
    with pytest.raises(ConfigError):
        arrival_times(3, 0.0, rng)


def test_multi_turn_prompts_extend_previous_turn_and_vocab_mapping():
    specs = multi_turn_workload(
        2, 3, 1.0, LengthDist("fixed", 10), LengthDist("fixed", 4), system_prompt_len=8, vocab_size=1000
    )
    a0, a1, a2 = specs[0], specs[1], specs[2]
    assert a1.parent == a0.request_id and a1.arrival_time == 5.0
    t0, t1 = a0.prompt_tokens(), a1.prompt_tokens()
    assert t1[: len(t0)] == t0
    assert t1[len(t0) : len(t0) + 4] == [a0.output_token(i) for i in range(4)]
    assert a2.prompt_len == 8 + 10 + 4 + 10 + 4 + 10
    assert all(0 <= x < 1000 for x in a2.prompt_tokens())
    assert specs[3].prompt_tokens()[:8] == t0[:8]  # same system prompt across conversations
    fast = time_scaled(specs, 0.5)
    assert fast[1].arrival_time == 2.5


def test_long_prompt_workload_has_its_stated_means():
    specs = long_prompt_workload()
    info = workload_summary(specs)
    assert info["requests"] == 4000
    assert info["mean_prompt_len"] == pytest.approx(15_000, rel=0.03)
    assert info["mean_output_len"] == pytest.approx(150, rel=0.05)
    assert info["arrival_span_s"] == pytest.approx(1_000, rel=0.05)
    # every prompt opens with one of 16 shared 12k-token documents, then its own question
    assert len({s.segments[0] for s in specs}) == 16
    assert all(s.segments[0][1] == 12_000 and len(s.segments) == 2 for s in specs)
    small = long_prompt_workload(10, 5.0, prefix_len=100, num_prefixes=2, question_len=50, output_len=8)
    assert len(small) == 10 and all(s.prompt_len > 100 for s in small)
    with pytest.raises(ConfigError):
        long_prompt_workload(0)


def test_prompt_tokens_match_prompt_len_with_an_empty_segment():
    spec = RequestSpec(1, 0.0, ((0, 0), (5000, 3), (7000, 0)), 2)
    assert spec.prompt_len == 3
    assert spec.prompt_tokens() == [5000 + 256, 1, 2]
