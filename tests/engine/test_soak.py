"""A small soak (benchmarks/soak.py runs the big one): a few hundred requests with random lengths,
priorities, sampling and aborts through a tight KV pool; afterwards no request holds KV, no block leaked,
and the process did not grow beyond a generous bound."""

from __future__ import annotations

import random

from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.dummy import dummy_model

TINY = ModelConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


def test_soak_returns_kv_to_zero_without_leaks():
    rng = random.Random(7)
    args = EngineArgs(
        max_model_len=160, tokens_per_block=8, num_device_blocks=48, num_host_blocks=16, max_batch_size=16,
        priority_mode=True,
    )  # fmt: skip
    ex = Engine(args, parts=build_engine_parts(args, loaded=(dummy_model(TINY, seed=1), TINY, None)))
    prefix = [rng.randrange(256) for _ in range(24)]
    live, ended, submitted, total = [], 0, 0, 300
    reasons: dict[str, int] = {}
    rss_start = None
    while ended < total:
        while submitted < total and len(live) < 24:
            head = prefix if rng.random() < 0.5 else []
            prompt = head + [rng.randrange(256) for _ in range(rng.randint(1, 60))]
            params = SamplingParams(
                max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.8]), logprobs=2
            )
            live.append(ex.add_request(prompt, params, priority=rng.choice([0, 5, 10])))
            submitted += 1
        done = [o.request_id for o in ex.step() if o.finished]
        if live and rng.random() < 0.1:
            victim = live[rng.randrange(len(live))]
            if victim not in done:
                ex.abort_request(victim)
                done.append(victim)
        for rid in done:
            reason = ex.pop_output(rid).outputs[0].finish_reason
            reasons[reason] = reasons.get(reason, 0) + 1
            live.remove(rid)
            ended += 1
        if rss_start is None and ended >= 50:  # after warm-up (allocator pools, caches)
            rss_start = _rss_mb()
    check_invariants(ex.kv)
    stats = ex.kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
    assert sum(reasons.values()) == total and reasons.get("abort", 0) > 0 and reasons.get("length", 0) > 0
    assert stats.num_suspends > 0 or ex.stats.num_preempted > 0  # the pool was tight enough to matter
    assert _rss_mb() - rss_start < 64, "the process grew by more than 64 MiB over the soak"
