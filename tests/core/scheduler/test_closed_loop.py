"""Closed loop with the real KV manager under memory pressure: every scheduler runs a workload to
completion; tokens, per-step budgets, KV coverage and block accounting are checked every step."""

from __future__ import annotations

import random

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import Request
from kvsched.core.scheduler import make_scheduler
from kvsched.core.step import apply_step

TPB = 8
DEVICE_BLOCKS = 24  # 192 tokens of KV; the workload's working set is several times larger
HOST_BLOCKS = 400
MAX_TOKENS_CHUNKED = 64
MAX_TOKENS_WHOLE = 100  # without chunking a recomputed context (prompt + outputs) must fit one step
MAX_BATCH = 12


def token_for(req: Request, k: int = 0) -> int:
    """Deterministic stand-in for sampling: a function of the request and the output position."""
    return 1000 + (req.request_id * 7 + len(req.output_token_ids) + k) % 500


def sample(req: Request, rng: random.Random) -> list[int]:
    """1 + accepted drafts tokens (drafts accepted at random), each the token of its position."""
    accepted = rng.randrange(len(req.draft_tokens) + 1)
    return [token_for(req, k) for k in range(1 + accepted)]


def workload(seed: int, shared_prefix: bool) -> list[Request]:
    rng = random.Random(seed)
    system = [rng.randrange(1, 900) for _ in range(24)]
    reqs = []
    for i in range(28):
        n = rng.randrange(12, 56)
        own = [rng.randrange(1, 900) for _ in range(n)]
        prompt = (system + own)[:60] if shared_prefix else own
        reqs.append(Request(i, prompt, rng.randrange(6, 36), arrival_time=float(i)))
    return reqs


def check_step(kv: KVCacheManager, out, unit: int | None, max_tokens: int) -> None:
    ctx, gen = out.context_requests, out.generation_requests
    scheduled = [r.request_id for r in ctx + gen]
    displaced = [r.request_id for r in out.paused_requests + out.preempted_requests]
    assert len(set(scheduled)) == len(scheduled) and not set(scheduled) & set(displaced)
    assert len(scheduled) <= MAX_BATCH
    tokens = sum(1 + len(r.draft_tokens) for r in gen)
    for r in ctx:
        last = r.context_current_position + r.context_chunk_size == r.num_context_tokens
        tokens += r.context_chunk_size + (len(r.draft_tokens) if last else 0)
    assert tokens == out.num_scheduled_tokens <= max_tokens
    for r in ctx:
        assert r.context_chunk_size > 0
        last = r.context_current_position + r.context_chunk_size == r.num_context_tokens
        assert last or unit is None or r.context_chunk_size % unit == 0
        assert kv.is_request_active(r.request_id)
        assert kv.capacity(r) >= r.context_current_position + r.context_chunk_size
    for r in gen:
        assert kv.is_request_active(r.request_id)
        assert kv.capacity(r) >= r.num_tokens + len(r.draft_tokens)  # room for what is fed this step


def run(
    kind: str,
    policy: str | None,
    unit: int | None,
    reuse: bool,
    seed: int = 0,
    drafts: int = 0,
    host_blocks: int = HOST_BLOCKS,
):
    config = CacheConfig(
        tokens_per_block=TPB,
        num_device_blocks=DEVICE_BLOCKS,
        num_host_blocks=host_blocks,
        enable_block_reuse=reuse,
    )
    kv = KVCacheManager(config, storage=None)
    max_tokens = MAX_TOKENS_WHOLE if unit is None else MAX_TOKENS_CHUNKED
    kw = {"max_batch_size": MAX_BATCH, "max_num_tokens": max_tokens, "chunk_unit_size": unit}
    if policy is not None:
        kw["policy"] = policy
    sched = make_scheduler(kind, kv, **kw)
    reqs = workload(seed, reuse)
    active = list(reqs)
    rng = random.Random(seed + 1)
    paused = preempted = steps = 0
    while active:
        steps += 1
        assert steps < 2000, "no progress"
        for r in active:
            if drafts and r.is_generation_in_progress_state:
                r.draft_tokens = [0] * rng.randrange(drafts + 1)
        out = sched.schedule(active)
        check_step(kv, out, unit, max_tokens)
        paused += len(out.paused_requests)
        preempted += len(out.preempted_requests)
        sampled = {r.request_id: sample(r, rng) for r in out.generation_requests}
        for r in out.context_requests:
            if r.context_current_position + r.context_chunk_size == r.num_context_tokens:
                sampled[r.request_id] = [token_for(r)]
        apply_step(out, sampled, kv, now=float(steps))
        check_invariants(kv)
        active = [r for r in active if not r.is_finished]
    for r in reqs:
        expected = [1000 + (r.request_id * 7 + k) % 500 for k in range(r.max_new_tokens)]
        assert r.output_token_ids == expected, r
        assert r.finish_reason == "length"
    stats = kv.stats()
    assert stats.num_requests == 0
    assert stats.used_device_blocks == 0 and stats.used_host_blocks == 0 and stats.active_device_blocks == 0
    assert kv.num_free_device_blocks == DEVICE_BLOCKS and kv.num_free_host_blocks == host_blocks
    return reqs, stats, paused, preempted


UNITS_REUSE = [(None, False), (16, False), (None, True), (16, True)]


@pytest.mark.parametrize("unit,reuse", UNITS_REUSE)
def test_unified_suspends_and_resumes_and_never_recomputes(unit, reuse):
    reqs, stats, paused, preempted = run("unified", None, unit, reuse)
    assert paused > 0 and stats.num_suspends > 0 and stats.num_resumes > 0
    assert preempted == 0
    assert all(r.num_preemptions == 0 and r.num_recomputed_tokens == 0 for r in reqs)


@pytest.mark.parametrize("unit,reuse", UNITS_REUSE)
def test_recompute_scheduler_recomputes(unit, reuse):
    reqs, stats, paused, preempted = run("recompute", None, unit, reuse)
    assert paused == 0 and stats.num_suspends == 0
    assert preempted > 0 and sum(r.num_recomputed_tokens for r in reqs) > 0


@pytest.mark.parametrize("unit,reuse", UNITS_REUSE)
@pytest.mark.parametrize("policy", ["max_utilization", "guaranteed_no_evict", "static_batch"])
def test_two_stage_completes(policy, unit, reuse):
    reqs, stats, paused, preempted = run("two-stage", policy, unit, reuse)
    assert paused == 0 and stats.num_suspends == 0
    if policy != "max_utilization":
        assert preempted == 0  # blocks to completion were reserved: nothing is ever paused


@pytest.mark.parametrize("kind", ["unified", "recompute"])
@pytest.mark.parametrize("seed", [1, 2])
def test_speculative_drafts_under_pressure(kind, seed):
    reqs, stats, paused, preempted = run(kind, None, 16, True, seed=seed, drafts=3)
    if kind == "unified":
        assert paused > 0 and preempted == 0 and stats.num_resumes > 0
    else:
        assert preempted > 0


@pytest.mark.parametrize("unit,reuse", UNITS_REUSE)
def test_without_a_host_tier_unified_degrades_to_recompute_and_completes(unit, reuse):
    # Suspension cannot happen: victims are preempted for recompute instead, never a deadlock; run()
    # checks every output token and that no block leaks.
    reqs, stats, paused, preempted = run("unified", None, unit, reuse, host_blocks=0)
    assert paused == 0 and stats.num_suspends == 0
    assert preempted > 0 and sum(r.num_recomputed_tokens for r in reqs) > 0
    reqs, stats, paused, preempted = run("recompute", None, unit, reuse, host_blocks=0)
    assert preempted > 0


@pytest.mark.parametrize("unit", [None, 16])
@pytest.mark.parametrize("host", [1, 4])
def test_a_host_tier_too_small_for_some_victims_mixes_suspend_and_recompute(unit, host):
    reqs, stats, paused, preempted = run("unified", None, unit, False, host_blocks=host)
    assert preempted > 0 and stats.num_suspends == paused
