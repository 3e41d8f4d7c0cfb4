"""Two-stage (V1) baseline: capacity policies, micro-batch budgets, KV after both stages."""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, ctx, running, started_ctx

from kvsched.core.errors import ConfigError
from kvsched.core.request import RequestState
from kvsched.core.scheduler import CapacityPolicy, TwoStageScheduler, make_scheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, policy, **kw):
    kw.setdefault("max_batch_size", 64)
    return TwoStageScheduler(kv, policy=policy, **kw)


def test_no_evict_admits_contexts_only_while_their_blocks_to_completion_fit():
    kv = FakeKV(num_device_blocks=9)  # 4 tokens per block; each request needs 8 + 8 = 16 -> 4 blocks
    reqs = [ctx(k, prompt=8, max_new=8) for k in range(3)]
    out = make(kv, "guaranteed_no_evict").schedule(reqs)
    assert ids(out.context_requests) == [0, 1]
    assert out.preempted_requests == [] and out.paused_requests == []


def test_no_evict_reserves_for_running_generations_first():
    kv = FakeKV(num_device_blocks=7)
    g = running(kv, 0, prompt=8, out=1, max_new=8)  # holds 2 blocks, will need 4 in total
    out = make(kv, CapacityPolicy.GUARANTEED_NO_EVICT).schedule([ctx(1, prompt=8, max_new=8), g])
    assert ids(out.generation_requests) == [0]
    assert ids(out.context_requests) == []  # 5 free - 2 reserved for g = 3 < the 4 it needs
    kv.num_device_blocks = 8
    out = make(kv, CapacityPolicy.GUARANTEED_NO_EVICT).schedule([ctx(2, prompt=8, max_new=8), g])
    assert ids(out.context_requests) == [2]


def test_static_batch_admits_contexts_only_when_nothing_is_decoding():
    kv = FakeKV()
    g = running(kv, 0)
    out = make(kv, "static_batch").schedule([g, ctx(1)])
    assert ids(out.generation_requests) == [0] and out.context_requests == []
    g.state = RequestState.GENERATION_COMPLETE
    out = make(kv, "static_batch").schedule([g, ctx(1)])
    assert ids(out.context_requests) == [1]


def test_max_utilization_preempts_started_requests_from_the_tail_for_recompute():
    kv = FakeKV(num_device_blocks=4)
    g0 = running(kv, 0, prompt=8)  # 2 full blocks: needs a third
    v1 = running(kv, 1, prompt=8, out=3)  # 3 blocks with 10 tokens: grows in place
    kv.caches[1].capacity = kv.caches[1].history = 8
    out = make(kv, "max_utilization").schedule([g0, v1])
    assert ids(out.generation_requests) == [0]
    assert ids(out.preempted_requests) == [1]
    assert v1.state == RequestState.CONTEXT_INIT and v1.num_preemptions == 1
    assert v1.num_context_tokens == 8 + 3 and v1.context_current_position == 0
    assert 1 not in kv.caches  # KV freed, not suspended
    assert out.paused_requests == []


def test_max_utilization_may_preempt_the_current_request_itself():
    kv = FakeKV(num_device_blocks=2)
    g0 = running(kv, 0, prompt=8)
    out = make(kv, "max_utilization").schedule([g0])
    assert ids(out.preempted_requests) == [0] and out.generation_requests == []


def test_max_utilization_skips_first_chunks_as_victims():
    kv = FakeKV(num_device_blocks=3)
    g0 = running(kv, 0, prompt=8)
    fresh = ctx(1, prompt=4)
    out = make(kv, "max_utilization").schedule([g0, fresh])
    assert ids(out.generation_requests) == [0] and out.preempted_requests == []
    assert out.context_requests == []  # no block left for it


def test_micro_batch_applies_token_budget_and_fcfs_chunks_after_capacity():
    kv = FakeKV()
    g = running(kv, 0)
    a, b = ctx(1, prompt=30), ctx(2, prompt=30)
    out = make(kv, "max_utilization", max_num_tokens=21, chunk_unit_size=8).schedule([a, g, b])
    assert ids(out.generation_requests) == [0]
    assert ids(out.context_requests) == [1] and a.context_chunk_size == 16
    assert out.num_scheduled_tokens == 17
    assert kv.capacity(a) == 30  # V1 allocates the whole prompt at the first chunk


def test_micro_batch_stops_at_the_batch_size_and_whole_contexts_over_budget():
    kv = FakeKV()
    reqs = [running(kv, 0), ctx(1, prompt=6), running(kv, 2), ctx(3, prompt=1)]
    out = make(kv, "guaranteed_no_evict", max_num_tokens=7).schedule(reqs)
    assert ids(out.generation_requests) == [0, 2]  # generations admitted first by capacity
    assert ids(out.context_requests) == []  # 1 + 1 + 6 > 7: stop
    out = make(kv, "guaranteed_no_evict", max_batch_size=1).schedule(reqs)
    assert ids(out.generation_requests) == [0] and out.context_requests == []


def test_prefix_reuse_found_at_allocation_shrinks_the_chunk():
    kv = FakeKV(reuse={0: 8})
    c = ctx(0, prompt=12)
    out = make(kv, "guaranteed_no_evict").schedule([c])
    assert c.context_chunk_size == 4 and out.num_scheduled_tokens == 4


def test_started_context_continues_and_lora_order_applies():
    kv = FakeKV()
    s = started_ctx(kv, 0, prompt=16, done=4, lora_id=3)
    p = ctx(1, prompt=4)
    out = make(kv, "max_utilization").schedule([s, p])
    assert ids(out.context_requests) == [1, 0]


def test_policy_by_name_and_bad_names():
    kv = FakeKV()
    sched = make_scheduler("two-stage", kv, policy="guaranteed-no-evict", max_batch_size=2)
    assert sched.policy is CapacityPolicy.GUARANTEED_NO_EVICT
    default = make_scheduler("two-stage", kv, policy=None, max_batch_size=2)
    assert default.policy is CapacityPolicy.MAX_UTILIZATION
    with pytest.raises(ConfigError, match="policy"):
        make_scheduler("two-stage", kv, policy="greedy", max_batch_size=2)
