"""Unified scheduler: pass order, token/batch budgets, in-flight, drafts, tail and self eviction."""

from __future__ import annotations

from sched_fakes import FakeKV, ctx, running, started_ctx

from kvsched.core.request import RequestState
from kvsched.core.scheduler import SchedulerOutput, UnifiedScheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, **kw):
    kw.setdefault("max_batch_size", 64)
    return UnifiedScheduler(kv, **kw)


def test_generations_are_allocated_before_any_context_whatever_the_list_order():
    kv = FakeKV()
    c0, g1, c2, g3 = ctx(0), running(kv, 1), ctx(2), running(kv, 3)
    out = make(kv).schedule([c0, g1, c2, g3])
    assert isinstance(out, SchedulerOutput)
    assert ids(out.generation_requests) == [1, 3]
    assert ids(out.context_requests) == [0, 2]
    first_ctx_call = next(k for k, (name, _) in enumerate(kv.calls) if name == "prepare")
    assert [rid for name, rid in kv.calls[:first_ctx_call]] == [1, 3]
    assert out.num_scheduled_tokens == 1 + 8 + 8 + 1
    assert c0.context_chunk_size == 8 and c2.context_chunk_size == 8  # full remainder, not chunked


def test_token_budget_stops_the_pass_and_later_contexts_are_never_looked_at():
    kv = FakeKV()
    g0, c1, g2, g3, c4 = running(kv, 0), ctx(1, prompt=3), running(kv, 2), running(kv, 3), ctx(4, prompt=1)
    out = make(kv, max_num_tokens=5).schedule([g0, c1, g2, g3, c4])
    # g0 + g2 + g3 = 3 tokens; c1 (3 tokens) does not fit the 2 left: the context phase stops there.
    assert ids(out.generation_requests) == [0, 2, 3]
    assert ids(out.context_requests) == []
    assert ("prepare", 4) not in kv.calls
    assert out.num_scheduled_tokens == 3


def test_contexts_after_the_stop_point_are_not_considered():
    kv = FakeKV()
    g0, c1, g2, c3 = running(kv, 0), ctx(1, prompt=2), running(kv, 2), ctx(3, prompt=1)
    g2.draft_tokens = [5, 5, 5]  # costs 4 > remaining budget: phase 1 stops at g2
    out = make(kv, max_num_tokens=4).schedule([g0, c1, g2, c3])
    assert ids(out.generation_requests) == [0]
    assert ids(out.context_requests) == [1]
    assert ("prepare", 3) not in kv.calls
    assert ("alloc", 2) not in kv.calls  # over budget: no allocation attempted


def test_batch_size_limit_counts_generations_and_contexts():
    kv = FakeKV()
    reqs = [running(kv, 0), ctx(1), running(kv, 2), ctx(3)]
    out = make(kv, max_batch_size=3).schedule(reqs)
    assert ids(out.generation_requests) == [0, 2]
    assert ids(out.context_requests) == [1]


def test_inflight_requests_are_skipped_and_cost_nothing():
    kv = FakeKV()
    reqs = [running(kv, 0), running(kv, 1), ctx(2, prompt=2)]
    out = make(kv, max_num_tokens=3, max_batch_size=2).schedule(reqs, inflight_request_ids={0})
    assert ids(out.generation_requests) == [1]
    assert ids(out.context_requests) == [2]
    assert ("alloc", 0) not in kv.calls
    again = make(kv, max_num_tokens=3, max_batch_size=2).schedule(reqs, inflight_request_ids=[1, 0])
    assert ids(again.context_requests) == [2] and again.generation_requests == []


def test_draft_tokens_cost_and_grow_the_allocation():
    kv = FakeKV()
    g = running(kv, 0)
    g.draft_tokens = [1, 2]
    before = kv.capacity(g)
    out = make(kv, max_num_tokens=3).schedule([g])
    assert out.num_scheduled_tokens == 3
    assert kv.capacity(g) == before + 3


def test_out_of_window_states_are_ignored():
    kv = FakeKV()
    done, to_complete = running(kv, 0), running(kv, 1)
    done.state = RequestState.GENERATION_COMPLETE
    to_complete.state = RequestState.GENERATION_TO_COMPLETE
    out = make(kv).schedule([done, to_complete])
    assert out.is_empty and kv.calls == []


def test_tail_eviction_suspends_from_the_end_until_the_request_fits():
    # 4 tokens per block; g0 holds 2 full blocks and needs a third, victims hold 2 blocks each.
    kv = FakeKV(num_device_blocks=6)
    g0, v1, v2 = running(kv, 0, prompt=8, out=1), running(kv, 1, prompt=8), running(kv, 2, prompt=8)
    out = make(kv).schedule([g0, v1, v2])
    assert ids(out.paused_requests) == [2]
    assert ids(out.generation_requests) == [0, 1]  # v1 still fits after v2 left
    assert not kv.is_request_active(2)
    assert v2.state == RequestState.GENERATION_IN_PROGRESS  # state kept: it resumes later


def test_tail_eviction_takes_several_victims_nearest_the_tail_first():
    kv = FakeKV(num_device_blocks=6)
    holder = running(kv, 9, prompt=4)  # out of the window, holds one block
    holder.state = RequestState.GENERATION_TO_COMPLETE
    g0 = running(kv, 0, prompt=8)  # 2 blocks, full
    g0.draft_tokens = [1, 2, 3, 4]  # needs capacity 13: two more blocks
    v1, v2, v3 = (running(kv, k, prompt=4) for k in (1, 2, 3))  # one full block each; device full
    out = make(kv).schedule([holder, g0, v1, v2, v3])
    assert kv.calls[:5] == [("alloc", 0), ("suspend", 3), ("alloc", 0), ("suspend", 2), ("alloc", 0)]
    # v1 needs a block, nothing after it is left (end shrank to v2): it self-evicts.
    assert ids(out.paused_requests) == [3, 2, 1]
    assert ids(out.generation_requests) == [0]
    assert out.num_scheduled_tokens == 5


def test_victims_are_never_before_the_failing_request_and_it_self_evicts():
    kv = FakeKV(num_device_blocks=4)
    v0 = running(kv, 0, prompt=7)  # 2 blocks with one free slot: grows in place
    g1 = running(kv, 1, prompt=8)  # 2 blocks, full: cannot grow
    out = make(kv).schedule([v0, g1])
    assert ids(out.generation_requests) == [0]
    assert ids(out.paused_requests) == [1]  # v0 (before it) is never a victim: g1 suspends itself
    assert kv.is_request_active(0) and not kv.is_request_active(1)
    assert ("suspend", 0) not in kv.calls


def test_self_eviction_stops_the_pass_but_earlier_contexts_still_run():
    kv = FakeKV(num_device_blocks=3)
    c0 = ctx(0, prompt=4)
    g1 = running(kv, 1, prompt=8)  # 2 blocks full, device has 1 free block
    kv.caches[1].capacity = 12  # 3 blocks: device full
    g2 = running(kv, 2, prompt=4)
    kv.caches[2].active = False  # suspended (no device blocks)
    out = make(kv).schedule([c0, g1, g2])
    assert ids(out.paused_requests) == [1]  # g1 self-evicted (no started victim after it is active)
    assert ids(out.generation_requests) == []
    assert ids(out.context_requests) == [0]  # c0 was seen before the stop
    assert ("alloc", 2) not in kv.calls


def test_an_already_suspended_failing_request_is_not_reported_again():
    kv = FakeKV(num_device_blocks=3)
    g_ok = running(kv, 0, prompt=7)  # 2 blocks, grows in place
    g1 = running(kv, 1, prompt=8)
    kv.caches[1].active = False  # suspended; resuming needs 2 blocks, only 1 is free
    out = make(kv).schedule([g_ok, g1])
    assert ids(out.generation_requests) == [0]
    assert out.paused_requests == []
    assert ("suspend", 1) not in kv.calls
    g_ok.state = RequestState.GENERATION_COMPLETE
    kv.free_request(g_ok)
    out = make(kv).schedule([g1])
    assert ids(out.generation_requests) == [1]  # resumed by the allocation itself
    assert kv.is_request_active(1)


def test_first_chunk_contexts_are_not_victims_but_started_contexts_are():
    kv = FakeKV(num_device_blocks=4)
    g0 = running(kv, 0, prompt=8)  # 2 blocks, full
    fresh = ctx(1, prompt=8)
    kv.caches[1] = type(kv.caches[0])(capacity=4, history=0, active=True)  # first chunk, 1 block
    started = started_ctx(kv, 2, prompt=16, done=4)  # 1 block
    out = make(kv).schedule([g0, fresh, started])
    assert ids(out.paused_requests) == [2]
    assert ids(out.generation_requests) == [0]
    # the fresh context was only touched later, by the context phase (its resize fails: no room)
    assert kv.calls.index(("suspend", 2)) < kv.calls.index(("prepare", 1))
    assert ids(out.context_requests) == []


def test_inflight_requests_are_never_victims():
    kv = FakeKV(num_device_blocks=4)
    g0, v1 = running(kv, 0, prompt=8), running(kv, 1, prompt=8)
    out = make(kv).schedule([g0, v1], inflight_request_ids={1})
    assert ids(out.paused_requests) == [0]  # self-evicts rather than suspending a running batch
    assert kv.is_request_active(1)
