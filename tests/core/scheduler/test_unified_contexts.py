"""Unified scheduler: the context phase (whole prompts and FCFS chunks) and the LoRA-aware order."""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, ctx, running, started_ctx

from kvsched.core.errors import InvalidRequestError
from kvsched.core.scheduler import UnifiedScheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, **kw):
    kw.setdefault("max_batch_size", 64)
    return UnifiedScheduler(kv, **kw)


# -- not chunked ----------------------------------------------------------------------------------
def test_prefix_reuse_is_looked_up_before_the_budget_check():
    kv = FakeKV(reuse={0: 8})
    c = ctx(0, prompt=10)
    out = make(kv, max_num_tokens=3).schedule([c])
    assert ids(out.context_requests) == [0]
    assert c.context_chunk_size == 2 and out.num_scheduled_tokens == 2
    assert kv.capacity(c) == 10


def test_context_that_does_not_fit_stops_the_context_phase():
    kv = FakeKV()
    big, small, tiny = ctx(0, prompt=6), ctx(1, prompt=2), ctx(2, prompt=1)
    out = make(kv, max_num_tokens=8).schedule([running(kv, 9), big, small, tiny])
    assert ids(out.context_requests) == [0]  # 1 + 6 used; small (2) does not fit: stop, tiny unseen
    assert ("prepare", 2) not in kv.calls
    assert out.num_scheduled_tokens == 7


def test_failed_resize_skips_to_the_next_context():
    kv = FakeKV(num_device_blocks=2)
    big, small = ctx(0, prompt=12), ctx(1, prompt=4)
    out = make(kv).schedule([big, small])
    assert ids(out.context_requests) == [1]
    assert not kv.is_request_active(0)  # the manager suspended the failed first chunk
    assert out.num_scheduled_tokens == 4


def test_failed_prepare_stops_the_context_phase():
    kv = FakeKV(num_device_blocks=1, reuse={0: 8})  # the reused prefix cannot be resumed
    out = make(kv).schedule([ctx(0, prompt=10), ctx(1, prompt=2)])
    assert out.context_requests == [] and ("prepare", 1) not in kv.calls


def test_context_drafts_are_part_of_the_cost_and_the_resize():
    kv = FakeKV()
    c = ctx(0, prompt=5)
    c.draft_tokens = [1, 2]
    out = make(kv, max_num_tokens=6).schedule([c])
    assert out.context_requests == []  # 5 + 2 > 6
    out = make(kv, max_num_tokens=7).schedule([c])
    assert ids(out.context_requests) == [0]
    assert c.context_chunk_size == 5 and kv.capacity(c) == 7 and out.num_scheduled_tokens == 7


def test_a_prompt_larger_than_the_whole_budget_is_a_clear_error_without_chunking():
    kv = FakeKV()
    with pytest.raises(InvalidRequestError, match="chunk_unit_size"):
        make(kv, max_num_tokens=4).schedule([ctx(0, prompt=9)])


# -- chunked --------------------------------------------------------------------------------------
def test_non_last_chunks_are_rounded_down_to_the_unit_and_the_last_is_not():
    kv = FakeKV()
    a, b = ctx(0, prompt=30), ctx(1, prompt=7)
    out = make(kv, max_num_tokens=21, chunk_unit_size=8).schedule([a, b])
    assert ids(out.context_requests) == [0]
    assert a.context_chunk_size == 16  # 21 rounded down to 2 units; 5 left < unit: b skipped
    assert ("prepare", 1) not in kv.calls  # skipped before prepare_context
    a.context_current_position = 16
    out = make(kv, max_num_tokens=21, chunk_unit_size=8).schedule([a, b])
    assert a.context_chunk_size == 14  # last chunk: not rounded
    assert ids(out.context_requests) == [0]  # 7 left < unit: b skipped even though it would fit
    assert out.num_scheduled_tokens == 14


def test_chunk_budget_flows_to_later_contexts_fcfs():
    kv = FakeKV()
    a, b = ctx(0, prompt=10), ctx(1, prompt=40)
    out = make(kv, max_num_tokens=32, chunk_unit_size=4).schedule([a, b])
    assert ids(out.context_requests) == [1, 0]  # non-last chunks first
    assert a.context_chunk_size == 10 and b.context_chunk_size == 20
    assert out.num_scheduled_tokens == 30


def test_last_chunk_carries_the_drafts_and_may_overshoot_the_budget():
    kv = FakeKV()
    c = ctx(0, prompt=10)
    c.draft_tokens = [1, 1, 1]
    out = make(kv, max_num_tokens=10, chunk_unit_size=4).schedule([c])
    assert c.context_chunk_size == 10 and out.num_scheduled_tokens == 13
    assert kv.capacity(c) == 13


def test_chunked_failures_skip_instead_of_stopping():
    kv = FakeKV(fail_resize={0})
    a, b = ctx(0, prompt=8), ctx(1, prompt=8)
    out = make(kv, max_num_tokens=16, chunk_unit_size=4).schedule([a, b])
    assert ids(out.context_requests) == [1]


def test_chunk_with_reuse_counts_only_the_new_tokens():
    kv = FakeKV(reuse={0: 12})
    c = ctx(0, prompt=20)
    out = make(kv, max_num_tokens=100, chunk_unit_size=4).schedule([c])
    assert c.context_chunk_size == 8 and out.num_scheduled_tokens == 8 and kv.capacity(c) == 20


def test_started_context_resumes_through_prepare():
    kv = FakeKV()
    c = started_ctx(kv, 0, prompt=16, done=4)
    kv.caches[0].active = False
    out = make(kv, chunk_unit_size=4, max_num_tokens=8).schedule([c])
    assert ids(out.context_requests) == [0] and c.context_chunk_size == 8
    assert kv.is_request_active(0)


# -- LoRA-aware order -----------------------------------------------------------------------------
def test_outputs_sorted_without_lora_first_then_by_adapter_id_stably():
    kv = FakeKV()
    gens = [running(kv, 0, lora_id=5), running(kv, 1), running(kv, 2, lora_id=3), running(kv, 3)]
    ctxs = [ctx(4, lora_id=2), ctx(5), ctx(6, lora_id=2), ctx(7, lora_id=1)]
    out = make(kv).schedule(gens + ctxs)
    assert ids(out.generation_requests) == [1, 3, 2, 0]
    assert ids(out.context_requests) == [5, 7, 4, 6]


def test_when_chunking_happened_non_last_chunks_come_first_each_group_in_lora_order():
    kv = FakeKV()
    last_lora = ctx(0, prompt=4, lora_id=1)
    last_plain = ctx(1, prompt=4)
    partial_lora = ctx(2, prompt=100, lora_id=0)
    skipped = ctx(3, prompt=100)
    out = make(kv, max_num_tokens=40, chunk_unit_size=4).schedule(
        [last_lora, last_plain, partial_lora, skipped]
    )
    assert ids(out.context_requests) == [2, 1, 0]
    assert partial_lora.context_chunk_size == 32 and not partial_lora.is_last_context_chunk
