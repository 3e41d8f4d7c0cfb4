"""Unified scheduler: LoRA requests in the generation pass (batch slots, acquire, deadlock), pages summed
over adapters, chunked prefill around a context that cannot resume, and the deadlock messages."""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, FakePeft, ctx, running, started_ctx

from kvsched.core.errors import SchedulerDeadlockError
from kvsched.core.request import RequestState
from kvsched.core.scheduler import UnifiedScheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, **kw):
    kw.setdefault("max_batch_size", 64)
    return UnifiedScheduler(kv, **kw)


def stuck(**kw):
    """A suspended generation that cannot resume: a finishing request holds the device, nothing can be
    evicted. Returns the fake KV and the request list (holder first)."""
    kv = FakeKV(num_device_blocks=3)
    g = running(kv, 0, prompt=8, **kw)
    kv.caches[0].active = False
    holder = running(kv, 1, prompt=8)
    holder.state = RequestState.GENERATION_TO_COMPLETE
    return kv, [holder, g]


def test_lora_generations_take_one_batch_slot_each():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=10)
    reqs = [running(kv, k, lora_id=1) for k in range(3)]
    out = make(kv, max_batch_size=2, peft_cache=peft).schedule(reqs)
    assert ids(out.generation_requests) == [0, 1]
    assert peft.acquired == [0, 1]


def test_a_scheduled_lora_context_acquires_its_adapter():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=10)
    out = make(kv, peft_cache=peft).schedule([ctx(0, lora_id=3), ctx(1)])
    assert ids(out.context_requests) == [1, 0]  # without LoRA first
    assert peft.acquired == [0]


def test_pages_of_several_finishing_adapters_add_up():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=5, pages={1: 2, 2: 2, 3: 2})
    done1, done2 = running(kv, 0, lora_id=1), running(kv, 1, lora_id=2)
    done1.state = done2.state = RequestState.GENERATION_TO_COMPLETE
    out = make(kv, peft_cache=peft).schedule([done1, done2, running(kv, 2, lora_id=3)])
    assert out.generation_requests == []  # 2 + 2 pre-claimed, adapter 3 needs 2 more than the 1 left


def test_pages_of_several_context_adapters_add_up():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=5, pages={1: 2, 2: 2, 3: 2})
    out = make(kv, peft_cache=peft).schedule([ctx(0, lora_id=1), ctx(1, lora_id=2), ctx(2, lora_id=3)])
    assert ids(out.context_requests) == [0, 1]


def test_a_lora_generation_that_cannot_be_allocated_or_evict_anything_raises():
    kv, reqs = stuck(lora_id=1)
    with pytest.raises(SchedulerDeadlockError, match="none could be scheduled or evicted"):
        make(kv, peft_cache=FakePeft(max_device_pages=4)).schedule(reqs)


def test_the_immediate_deadlock_message_names_both_fixes():
    kv, reqs = stuck()
    with pytest.raises(SchedulerDeadlockError) as err:
        make(kv).schedule(reqs)
    msg = str(err.value)
    assert "none could be scheduled or evicted" in msg
    assert "CacheConfig.num_host_blocks > 0" in msg and "(CacheConfig.num_device_blocks)." in msg


def test_the_stall_deadlock_message_says_how_many_steps_stalled():
    kv = FakeKV(num_device_blocks=2)
    g = running(kv, 0, prompt=8)
    sched = make(kv)
    for _ in range(UnifiedScheduler.STALL_LIMIT - 1):
        sched.schedule([g])
    with pytest.raises(SchedulerDeadlockError) as err:
        sched.schedule([g])
    msg = str(err.value)
    assert f"nothing was scheduled for {UnifiedScheduler.STALL_LIMIT} steps in a row" in msg
    assert "none could be" not in msg


def test_dropping_a_generation_with_drafts_gives_back_every_token_it_grew_by():
    kv = FakeKV()
    g0, g1 = running(kv, 0), running(kv, 1)
    g1.draft_tokens = [4, 5]
    before = kv.capacity(g1)
    sched = make(kv)
    out = sched.schedule([g0, g1])
    assert out.num_scheduled_tokens == 1 + 3 and kv.capacity(g1) == before + 3
    sched.drop_scheduled(out, [g1])
    assert ids(out.generation_requests) == [0] and out.num_scheduled_tokens == 1
    assert kv.capacity(g1) == before


def test_chunked_prefill_goes_past_a_context_that_cannot_resume():
    kv = FakeKV(num_device_blocks=3)
    stuck = started_ctx(kv, 0, prompt=32, done=16)  # 4 blocks on the host: never fits 3
    kv.caches[0].active = False
    small = ctx(1, prompt=4)
    out = make(kv, max_num_tokens=16, chunk_unit_size=4).schedule([stuck, small])
    assert ids(out.context_requests) == [1]
    assert ("prepare", 0) in kv.calls


def test_a_single_remaining_context_token_is_scheduled_when_chunking():
    kv = FakeKV(reuse={0: 8})
    c = ctx(0, prompt=9)
    out = make(kv, max_num_tokens=16, chunk_unit_size=4).schedule([c])
    assert ids(out.context_requests) == [0]
    assert c.context_chunk_size == 1 and out.num_scheduled_tokens == 1


def test_the_deadlock_message_is_one_sentence_that_ends_with_the_fix():
    kv, reqs = stuck()
    with pytest.raises(SchedulerDeadlockError) as err:
        make(kv).schedule(reqs)
    assert str(err.value) == (
        "unified scheduler deadlock: generation requests are active but none could be scheduled or "
        "evicted: the device KV pool is exhausted. Configure a host tier (CacheConfig.num_host_blocks "
        "> 0) so requests can be suspended, or give the device more blocks (CacheConfig.num_device_blocks)."
    )


def test_in_flight_lora_requests_are_never_victims():
    kv = FakeKV(num_device_blocks=4)
    peft = FakePeft(max_device_pages=10)
    g0, v1 = running(kv, 0, prompt=8, lora_id=1), running(kv, 1, prompt=8, lora_id=2)
    out = make(kv, peft_cache=peft).schedule([g0, v1], inflight_request_ids={1})
    assert ids(out.paused_requests) == [0]  # self-evicts rather than suspending a running batch
    assert kv.is_request_active(1) and peft.released == [0]


def test_a_lora_generation_that_cannot_grow_suspends_itself():
    kv = FakeKV(num_device_blocks=4)
    peft = FakePeft(max_device_pages=10)
    v0 = running(kv, 0, prompt=7, lora_id=1)  # grows in place
    g1 = running(kv, 1, prompt=8, lora_id=2)  # 2 full blocks, nothing after it to evict
    out = make(kv, peft_cache=peft).schedule([v0, g1])
    assert ids(out.generation_requests) == [0] and ids(out.paused_requests) == [1]
    assert not kv.is_request_active(1) and peft.released == [1]


def test_contexts_see_the_budget_a_stopped_generation_phase_left():
    kv = FakeKV()
    c0 = ctx(0, prompt=3)
    g1, g2 = running(kv, 1), running(kv, 2)
    g2.draft_tokens = [1, 1]  # costs 3, only 2 left: the generation phase stops here
    out = make(kv, max_num_tokens=3).schedule([c0, g1, g2])
    assert ids(out.generation_requests) == [1] and out.context_requests == []
    assert out.num_scheduled_tokens == 1
    c0b = ctx(3, prompt=2)
    out = make(kv, max_num_tokens=3).schedule([c0b, g1, g2])
    assert ids(out.context_requests) == [3] and out.num_scheduled_tokens == 3


def test_a_batch_limit_after_a_cut_chunk_keeps_non_last_chunks_first():
    kv = FakeKV()
    whole, cut, late = ctx(0, prompt=4), ctx(1, prompt=16), ctx(2, prompt=4)
    out = make(kv, max_batch_size=2, max_num_tokens=12, chunk_unit_size=4).schedule([whole, cut, late])
    assert ids(out.context_requests) == [1, 0]  # the cut chunk first, then the last chunk
    assert cut.context_chunk_size == 8


def test_contexts_see_the_budget_left_when_lora_pages_stopped_the_generations():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=3, pages={1: 2, 2: 2})
    c0 = ctx(0, prompt=2)
    g1, g2 = running(kv, 1, lora_id=1), running(kv, 2, lora_id=2)
    out = make(kv, max_batch_size=2, peft_cache=peft).schedule([c0, g1, g2])
    assert ids(out.generation_requests) == [1] and ids(out.context_requests) == [0]
    assert out.num_scheduled_tokens == 3
    out = make(kv, max_batch_size=1, peft_cache=peft).schedule([c0, g1, g2])
    assert out.context_requests == []  # the one batch slot went to g1


def test_preempting_a_victim_frees_its_draft_cache_too():
    kv, draft = FakeKV(num_device_blocks=4, num_host_blocks=0), FakeKV()
    g0, v1 = running(kv, 0, prompt=8), running(kv, 1, prompt=8)
    running(draft, 1, prompt=8)
    out = make(kv, draft_kv_cache_manager=draft).schedule([g0, v1])
    assert ids(out.preempted_requests) == [1] and ids(out.generation_requests) == [0]
    assert 1 not in draft.caches and ("free", 1) in draft.calls
    assert v1.state == RequestState.CONTEXT_INIT and v1.num_preemptions == 1
    kv2, empty_draft = FakeKV(num_device_blocks=4, num_host_blocks=0), FakeKV()
    g0, v1 = running(kv2, 0, prompt=8), running(kv2, 1, prompt=8)
    out = make(kv2, draft_kv_cache_manager=empty_draft).schedule([g0, v1])  # the draft never saw v1
    assert ids(out.preempted_requests) == [1]


def test_a_request_whose_draft_cache_cannot_follow_is_dropped_from_the_step():
    # The draft pool has room for one request's blocks only: the second scheduled request cannot be
    # mirrored, so it leaves this step and its main growth is given back.
    kv, draft = FakeKV(), FakeKV(num_device_blocks=3)
    g0, g1 = running(kv, 0, prompt=8), running(kv, 1, prompt=8)
    running(draft, 0, prompt=8)
    running(draft, 1, prompt=8)
    draft.caches[1].active = False  # on the draft host tier; resuming needs 2 of the 1 free block
    before = kv.capacity(g1)
    out = make(kv, draft_kv_cache_manager=draft).schedule([g0, g1])
    assert ids(out.generation_requests) == [0]
    assert out.num_scheduled_tokens == 1
    assert kv.capacity(g1) == before and draft.capacity(g0) == kv.capacity(g0)
