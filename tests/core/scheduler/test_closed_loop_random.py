"""Random closed loops with the real KV manager: any sane configuration runs to completion with
exact outputs and no leaked blocks, under every scheduler."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hypothesis_budget import mutation_budget
from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import Request
from kvsched.core.scheduler import make_scheduler
from kvsched.core.step import apply_step


def tok(req: Request, k: int) -> int:
    return 1000 + (req.request_id * 13 + len(req.output_token_ids) + k) % 300


@settings(max_examples=mutation_budget(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["unified", "unified", "two-stage", "recompute"]),
    policy=st.sampled_from(["max_utilization", "guaranteed_no_evict"]),
    seed=st.integers(0, 10_000),
    tpb=st.sampled_from([4, 8, 16]),
    slack=st.integers(0, 20),
    unit=st.one_of(st.none(), st.integers(1, 16)),
    reuse=st.booleans(),
    drafts=st.integers(0, 3),
    batch=st.integers(1, 10),
    priority=st.booleans(),
)
# Two started contexts that filled the device between them once waited for each other forever.
@example(kind="unified", policy="max_utilization", seed=2, tpb=16, slack=0, unit=2, reuse=False,
         drafts=0, batch=2, priority=False)  # fmt: skip
@example(kind="unified", policy="max_utilization", seed=160, tpb=16, slack=0, unit=1, reuse=False,
         drafts=0, batch=3, priority=False)  # fmt: skip
def test_random_workloads_complete_without_leaks(
    kind, policy, seed, tpb, slack, unit, reuse, drafts, batch, priority
):
    rng = random.Random(seed)
    shared = [rng.randrange(1, 50) for _ in range(3 * tpb)]
    reqs = []
    for i in range(rng.randrange(1, 16)):
        prompt = shared[: rng.randrange(len(shared) + 1)] + [
            rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))
        ]
        reqs.append(
            Request(i, prompt, rng.randrange(1, 24), priority=rng.randrange(3), arrival_time=float(i))
        )
    longest = max(len(r.prompt_token_ids) + r.max_new_tokens + drafts for r in reqs)
    device = -(-longest // tpb) + 1 + slack
    host = (
        0
        if kind != "unified"
        else 4 * sum(-(-(len(r.prompt_token_ids) + r.max_new_tokens + drafts) // tpb) + 1 for r in reqs)
    )
    kv = KVCacheManager(
        CacheConfig(
            tokens_per_block=tpb, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=reuse
        ),
        storage=None,
    )
    max_tokens = (
        None
        if rng.random() < 0.2
        else (longest + drafts if unit is None else max(unit, rng.randrange(1, 64)))
    )
    kw = {
        "max_batch_size": batch,
        "max_num_tokens": max_tokens,
        "chunk_unit_size": unit,
        "priority_mode": priority,
    }
    if kind == "two-stage":
        kw["policy"] = policy
    sched = make_scheduler(kind, kv, **kw)
    active = list(reqs)
    for step in range(3000):
        if not active:
            break
        for r in active:
            if drafts and r.is_generation_in_progress_state:
                r.draft_tokens = [0] * rng.randrange(drafts + 1)
        out = sched.schedule(active)
        sampled = {}
        for r in out.generation_requests:
            sampled[r.request_id] = [tok(r, k) for k in range(1 + rng.randrange(len(r.draft_tokens) + 1))]
        for r in out.context_requests:
            if r.context_current_position + r.context_chunk_size == r.num_context_tokens:
                sampled[r.request_id] = [tok(r, 0)]
        apply_step(out, sampled, kv, now=float(step))
        check_invariants(kv)
        active = [r for r in active if not r.is_finished]
    assert not active, f"no progress: {active}"
    for r in reqs:
        assert r.output_token_ids == [1000 + (r.request_id * 13 + k) % 300 for k in range(r.max_new_tokens)]
        if kind == "unified":
            assert r.num_preemptions == 0
    stats = kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == 0 and stats.used_host_blocks == 0
