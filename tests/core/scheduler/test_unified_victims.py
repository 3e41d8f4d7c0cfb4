"""Unified scheduler: what happens to tail victims later in the same pass, stall counting, the last
chunk unit of budget, and undoing a dropped context that carries drafts.

TensorRT-LLM's unified scheduler (PR #11939, ``KVCacheV2Scheduler``) stops the pass at the victim: a
request suspended from the tail to make room is neither allocated again nor overtaken by a request
behind it in the same step.
"""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, ctx, running, started_ctx

from kvsched.core.errors import SchedulerDeadlockError
from kvsched.core.request import RequestState
from kvsched.core.scheduler import UnifiedScheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, **kw):
    kw.setdefault("max_batch_size", 64)
    return UnifiedScheduler(kv, **kw)


def calls_after(kv: FakeKV, call: tuple[str, int]) -> list[tuple[str, int]]:
    return kv.calls[kv.calls.index(call) + 1 :]


def test_a_generation_taken_as_tail_victim_gets_no_allocation_later_in_the_pass():
    # 4 tokens per block. g0 holds 2 full blocks and needs a third; g1 grows in place; v2 is the tail.
    kv = FakeKV(num_device_blocks=6)
    g0 = running(kv, 0, prompt=8)
    g1 = running(kv, 1, prompt=6)
    v2 = running(kv, 2, prompt=8)
    out = make(kv).schedule([g0, g1, v2])
    assert ids(out.generation_requests) == [0, 1]
    assert ids(out.paused_requests) == [2]
    # The victim is where the pass ends: nothing touches it again this step.
    assert [c for c in calls_after(kv, ("suspend", 2)) if c[1] == 2] == []
    assert not kv.is_request_active(2)


def test_nothing_behind_a_tail_victim_is_scheduled_into_the_room_it_freed():
    # Device: g0 2 blocks (needs a 3rd), g1 2 blocks (grows in place), victim c2 3 blocks = 7, full.
    # s3 is suspended behind the victim; once c2 leaves, 2 blocks are free after g0 grows, which
    # would be enough to resume s3 (1 block + 1 to grow) if the pass went on past the victim.
    kv = FakeKV(num_device_blocks=7)
    g0 = running(kv, 0, prompt=8)
    g1 = running(kv, 1, prompt=6)
    c2 = started_ctx(kv, 2, prompt=16, done=12)
    s3 = running(kv, 3, prompt=4)
    kv.caches[3].active = False
    out = make(kv).schedule([g0, g1, c2, s3])
    assert ids(out.paused_requests) == [2]
    assert ids(out.generation_requests) == [0, 1]
    assert out.context_requests == []
    assert not kv.is_request_active(3)
    tail = calls_after(kv, ("suspend", 2))
    assert ("alloc", 3) not in tail and ("prepare", 2) not in tail
    assert kv.num_free_device_blocks == 2


class StarvedKV(FakeKV):
    """Suspension that frees nothing (the manager accepts it, the blocks stay on the device: a
    suspend/resume ping-pong) and, while ``starved``, every allocation fails."""

    def can_suspend(self, req):
        return self.is_request_active(req.request_id)

    def __init__(self) -> None:
        super().__init__(num_device_blocks=1000, num_host_blocks=0)
        self.starved = True

    def try_allocate_generation(self, req):
        if self.starved:
            self.calls.append(("alloc", req.request_id))
            return False
        return super().try_allocate_generation(req)


def _stall(sched, kv, reqs, steps):
    kv.starved = True
    for _ in range(steps):
        out = sched.schedule(reqs)
        assert out.generation_requests == [] and out.paused_requests  # suspend/resume ping-pong


def test_stalls_separated_by_a_productive_step_do_not_add_up_to_a_deadlock():
    kv = StarvedKV()
    reqs = [running(kv, 0), running(kv, 1)]
    sched = make(kv)
    limit = UnifiedScheduler.STALL_LIMIT
    for _ in range(3):
        _stall(sched, kv, reqs, limit - 1)
        kv.starved = False
        assert ids(sched.schedule(reqs).generation_requests) == [0, 1]
    _stall(sched, kv, reqs, limit - 1)


def test_stall_limit_consecutive_barren_steps_raise_a_deadlock_naming_the_fix():
    kv = StarvedKV()
    reqs = [running(kv, 0), running(kv, 1)]
    sched = make(kv)
    _stall(sched, kv, reqs, UnifiedScheduler.STALL_LIMIT - 1)
    with pytest.raises(SchedulerDeadlockError, match="num_host_blocks"):
        sched.schedule(reqs)


def test_a_step_stopped_by_a_budget_resets_the_stall_count():
    kv = StarvedKV()
    reqs = [running(kv, 0), running(kv, 1)]
    sched = make(kv, max_num_tokens=2)
    limit = UnifiedScheduler.STALL_LIMIT
    _stall(sched, kv, reqs, limit - 1)
    reqs[0].draft_tokens = [5, 6]  # costs 3 > 2: the token budget (not KV) stops the pass at once
    before = len(kv.calls)
    out = sched.schedule(reqs)
    assert out.is_empty and kv.calls[before:] == []
    reqs[0].draft_tokens = []
    _stall(sched, kv, reqs, limit - 1)


def test_exactly_one_chunk_unit_of_budget_left_still_admits_a_chunk():
    kv = FakeKV()
    g0 = running(kv, 0)
    c1 = ctx(1, prompt=16)
    out = make(kv, max_num_tokens=5, chunk_unit_size=4).schedule([g0, c1])
    assert ids(out.context_requests) == [1]
    assert c1.context_chunk_size == 4
    assert out.num_scheduled_tokens == 5


def test_less_than_one_chunk_unit_left_skips_the_context():
    kv = FakeKV()
    g0, g1 = running(kv, 0), running(kv, 1)
    c2 = ctx(2, prompt=16)
    out = make(kv, max_num_tokens=5, chunk_unit_size=4).schedule([g0, g1, c2])
    assert out.context_requests == [] and out.num_scheduled_tokens == 2
    assert ("prepare", 2) not in kv.calls


def test_dropping_a_last_chunk_with_drafts_gives_back_the_chunk_and_its_drafts():
    kv = FakeKV()
    g0 = running(kv, 0)
    c1 = ctx(1, prompt=8)
    c1.draft_tokens = [5, 6]
    sched = make(kv, max_num_tokens=100, chunk_unit_size=4)
    out = sched.schedule([g0, c1])
    assert out.num_scheduled_tokens == 1 + 8 + 2
    assert kv.capacity(c1) == 10
    sched.drop_scheduled(out, [c1])
    assert out.context_requests == [] and ids(out.generation_requests) == [0]
    assert out.num_scheduled_tokens == 1
    assert kv.capacity(c1) == 0
    assert c1.state == RequestState.CONTEXT_INIT and c1.context_current_position == 0


def test_dropping_a_non_last_chunk_gives_back_only_the_chunk():
    kv = FakeKV()
    c0 = ctx(0, prompt=16)
    c0.draft_tokens = [5, 6]  # drafts ride on the last chunk only
    sched = make(kv, max_num_tokens=8, chunk_unit_size=4)
    out = sched.schedule([c0])
    assert c0.context_chunk_size == 8 and out.num_scheduled_tokens == 8
    sched.drop_scheduled(out, [c0])
    assert out.num_scheduled_tokens == 0 and kv.capacity(c0) == 0


def test_a_started_context_that_cannot_grow_suspends_started_contexts_behind_it():
    # Two half-computed prompts fill the device (3 + 3 of 6 blocks); neither could ever grow while the
    # other holds its blocks. The first one suspends the second and goes on.
    kv = FakeKV(num_device_blocks=6)
    a = started_ctx(kv, 0, prompt=20, done=12)  # its last 8 tokens need 2 more blocks
    b = started_ctx(kv, 1, prompt=32, done=12)
    sched = make(kv, max_num_tokens=16, chunk_unit_size=4)  # budget is left for b after a
    out = sched.schedule([a, b])
    assert ids(out.context_requests) == [0] and a.context_chunk_size == 8
    assert ids(out.paused_requests) == [1] and not kv.is_request_active(1)
    after = calls_after(kv, ("suspend", 1))
    assert ("resize", 0) in after  # a's resize was retried after it
    assert ("prepare", 1) not in after  # the victim is not looked at again this step


def test_a_fresh_context_never_suspends_started_work():
    kv = FakeKV(num_device_blocks=6)
    fresh = ctx(0, prompt=16)
    started = started_ctx(kv, 1, prompt=32, done=24)  # all 6 blocks
    out = make(kv, max_num_tokens=8, chunk_unit_size=4).schedule([fresh, started])
    assert out.paused_requests == [] and ("suspend", 1) not in kv.calls
    assert out.context_requests == []  # the started one cannot grow either, and nothing is behind it


def test_whole_prompt_mode_also_lets_the_first_started_context_through():
    kv = FakeKV(num_device_blocks=6)
    a = started_ctx(kv, 0, prompt=16, done=12)  # 4 tokens left: needs a 4th block
    b = started_ctx(kv, 1, prompt=16, done=12)
    out = make(kv).schedule([a, b])
    assert ids(out.context_requests) == [0] and a.context_chunk_size == 4
    assert ids(out.paused_requests) == [1]


def test_context_eviction_stops_as_soon_as_the_request_fits():
    kv = FakeKV(num_device_blocks=9)
    a = started_ctx(kv, 0, prompt=32, done=12)  # 3 blocks, needs 2 more for a chunk of 8
    b = started_ctx(kv, 1, prompt=32, done=12)
    c = started_ctx(kv, 2, prompt=32, done=12)
    out = make(kv, max_num_tokens=8, chunk_unit_size=4).schedule([a, b, c])
    assert ids(out.context_requests) == [0] and ids(out.paused_requests) == [2]
    assert kv.is_request_active(1)


def test_context_eviction_takes_as_many_victims_as_needed_from_the_tail():
    kv = FakeKV(num_device_blocks=7)
    a = started_ctx(kv, 0, prompt=40, done=12)  # 3 blocks; a chunk of 12 needs 3 more
    b = started_ctx(kv, 1, prompt=32, done=8)  # 2 blocks
    c = started_ctx(kv, 2, prompt=32, done=8)  # 2 blocks
    out = make(kv, max_num_tokens=12, chunk_unit_size=4).schedule([a, b, c])
    assert ids(out.context_requests) == [0] and a.context_chunk_size == 12
    assert ids(out.paused_requests) == [2, 1]


def test_suspended_contexts_behind_are_not_victims_and_keep_their_kv():
    kv = FakeKV(num_device_blocks=6)
    a = started_ctx(kv, 0, prompt=32, done=24)  # all 6 blocks, cannot grow
    s = started_ctx(kv, 1, prompt=32, done=8)
    kv.caches[1].active = False  # on the host
    out = make(kv, max_num_tokens=8, chunk_unit_size=4).schedule([a, s])
    assert out.paused_requests == [] and out.preempted_requests == [] and out.context_requests == []
    assert kv.caches[1].capacity == 8 and s.num_preemptions == 0


def test_a_started_context_never_displaces_itself():
    kv = FakeKV(num_device_blocks=6)
    a = started_ctx(kv, 0, prompt=32, done=24)
    fresh = ctx(1, prompt=8)
    out = make(kv, max_num_tokens=8, chunk_unit_size=4).schedule([a, fresh])
    assert out.paused_requests == [] and out.preempted_requests == [] and kv.is_request_active(0)


@pytest.mark.parametrize("unit", [None, 4])
def test_a_context_short_of_token_budget_displaces_nobody(unit):
    kv = FakeKV(num_device_blocks=100)
    g = running(kv, 0)
    a = started_ctx(kv, 1, prompt=32, done=12)  # 20 tokens left
    b = started_ctx(kv, 2, prompt=32, done=12)
    budget = 4 if unit else 20  # chunked: 3 tokens left < unit; whole: 20 tokens > 19 left
    out = make(kv, max_num_tokens=budget, chunk_unit_size=unit).schedule([g, a, b])
    assert out.paused_requests == [] and ("suspend", 2) not in kv.calls
    assert kv.is_request_active(2)
