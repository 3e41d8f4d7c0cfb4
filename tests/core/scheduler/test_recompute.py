"""Recompute (vLLM v1 shaped) baseline: running first, newest preempted, no admission after one."""

from __future__ import annotations

from sched_fakes import FakeKV, ctx

from kvsched.core.request import RequestState
from kvsched.core.scheduler import RecomputeScheduler, make_scheduler
from kvsched.core.step import apply_step


def ids(reqs):
    return [r.request_id for r in reqs]


def step(sched, kv, reqs):
    out = sched.schedule(reqs)
    sampled = {r.request_id: [5] for r in out.generation_requests}
    sampled.update({r.request_id: [5] for r in out.context_requests if r.is_last_context_chunk})
    apply_step(out, sampled, kv)
    return out


def test_waiting_requests_are_admitted_fcfs_and_then_run_first():
    kv = FakeKV()
    sched = RecomputeScheduler(kv, max_batch_size=8, max_num_tokens=10)
    a, b, c = ctx(0, prompt=4), ctx(1, prompt=4), ctx(2, prompt=4)
    out = step(sched, kv, [a, b, c])
    assert ids(out.context_requests) == [0, 1]  # c (4) no longer fits the 2 tokens left: stop
    out = step(sched, kv, [a, b, c])
    assert ids(out.generation_requests) == [0, 1] and ids(out.context_requests) == [2]


def test_the_most_recently_admitted_request_is_preempted_and_nothing_is_admitted_that_step():
    kv = FakeKV(num_device_blocks=4)  # 4 tokens per block
    sched = RecomputeScheduler(kv, max_batch_size=8)
    late_arrival = ctx(0, prompt=7, max_new=20)
    early = ctx(1, prompt=7, max_new=3)
    waiting = ctx(2, prompt=3, max_new=20)
    step(sched, kv, [early])  # admitted first
    step(sched, kv, [late_arrival, early])  # admitted second although earlier in the list
    # both hold 2 blocks (all 4); early's next decode needs a third block
    out = step(sched, kv, [late_arrival, early, waiting])
    assert ids(out.preempted_requests) == [0]
    assert ids(out.generation_requests) == [1]
    assert out.context_requests == []  # no admission in a step that preempted
    assert late_arrival.state == RequestState.CONTEXT_INIT and late_arrival.num_preemptions == 1
    assert late_arrival.num_context_tokens == 8 and 0 not in kv.caches
    assert early.state == RequestState.GENERATION_COMPLETE
    out = step(sched, kv, [late_arrival, waiting])
    assert ids(out.context_requests) == [0, 2]  # recomputes prompt + its one output
    assert late_arrival.output_token_ids == [5, 5] and late_arrival.num_recomputed_tokens == 7


def test_a_request_that_cannot_grow_alone_preempts_itself():
    kv = FakeKV(num_device_blocks=2)
    sched = make_scheduler("recompute", kv, max_batch_size=4)
    r = ctx(0, prompt=8, max_new=4)
    step(sched, kv, [r])
    out = step(sched, kv, [r])
    assert ids(out.preempted_requests) == [0] and out.generation_requests == []


def test_finished_requests_leave_the_running_set():
    kv = FakeKV()
    sched = RecomputeScheduler(kv, max_batch_size=1)
    a, b = ctx(0, prompt=4, max_new=1), ctx(1, prompt=4, max_new=1)
    out = step(sched, kv, [a, b])
    assert ids(out.context_requests) == [0] and a.state == RequestState.GENERATION_COMPLETE
    out = step(sched, kv, [b])
    assert ids(out.context_requests) == [1]


def test_chunked_running_context_continues_before_new_ones():
    kv = FakeKV()
    sched = RecomputeScheduler(kv, max_batch_size=4, max_num_tokens=8, chunk_unit_size=4)
    a, b = ctx(0, prompt=20), ctx(1, prompt=4)
    out = step(sched, kv, [a, b])
    assert ids(out.context_requests) == [0] and a.context_chunk_size == 8
    out = step(sched, kv, [a, b])
    assert ids(out.context_requests) == [0] and a.context_current_position == 16
    out = step(sched, kv, [a, b])
    assert ids(out.context_requests) == [0, 1]  # a finishes its prompt, b is admitted
