"""Unified scheduler: LoRA pages, deadlock vs budget stops, priority mode, revert, construction."""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, FakePeft, ctx, running

from kvsched.core.errors import ConfigError, SchedulerDeadlockError
from kvsched.core.request import RequestState
from kvsched.core.scheduler import UnifiedScheduler, make_scheduler


def ids(reqs):
    return [r.request_id for r in reqs]


def make(kv, **kw):
    kw.setdefault("max_batch_size", 64)
    return UnifiedScheduler(kv, **kw)


# -- LoRA pages -----------------------------------------------------------------------------------
def test_each_adapter_is_counted_once_and_a_short_generation_stops_the_pass():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=5, pages={1: 2, 2: 2, 3: 2})
    reqs = [running(kv, k, lora_id=lora) for k, lora in enumerate([1, 1, 2, 3, None])]
    reqs.append(ctx(9))
    out = make(kv, peft_cache=peft).schedule(reqs)
    # adapters 1 and 2 use 4 pages; adapter 3 needs 2 more than the 1 left: the pass stops there.
    assert ids(out.generation_requests) == [0, 1, 2]
    assert out.context_requests == []  # ctx 9 came after the stop
    assert peft.acquired == [0, 1, 2]


def test_a_context_short_of_pages_is_skipped_and_later_ones_still_run():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=2, pages={1: 2, 2: 1})
    reqs = [ctx(0, lora_id=1), ctx(1, lora_id=2), ctx(2), ctx(3, lora_id=1)]
    out = make(kv, peft_cache=peft).schedule(reqs)
    assert ids(out.context_requests) == [2, 0, 3]  # 1 skipped (adapter 2 does not fit), sorted by LoRA


def test_pages_are_committed_only_after_the_kv_allocation_succeeded():
    kv = FakeKV(fail_resize={0})
    peft = FakePeft(max_device_pages=2, pages={1: 2, 2: 2})
    out = make(kv, peft_cache=peft).schedule([ctx(0, lora_id=1), ctx(1, lora_id=2)])
    assert ids(out.context_requests) == [1]


def test_adapters_of_finishing_requests_are_pre_claimed():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=3, pages={1: 2, 2: 2})
    finishing = running(kv, 0, lora_id=1)
    finishing.state = RequestState.GENERATION_TO_COMPLETE
    reqs = [finishing, running(kv, 1, lora_id=2), running(kv, 2, lora_id=1)]
    out = make(kv, peft_cache=peft).schedule(reqs)
    assert out.generation_requests == []  # adapter 2 does not fit next to the pre-claimed adapter 1
    reqs = [finishing, running(kv, 2, lora_id=1)]
    assert ids(make(kv, peft_cache=peft).schedule(reqs).generation_requests) == [2]


def test_page_budget_resets_every_call():
    kv = FakeKV()
    peft = FakePeft(max_device_pages=2, pages={1: 2})
    sched = make(kv, peft_cache=peft)
    for _ in range(3):
        assert ids(sched.schedule([running(kv, 0, lora_id=1)]).generation_requests) == [0]


def test_suspending_a_request_releases_its_adapter():
    kv = FakeKV(num_device_blocks=4)
    peft = FakePeft(max_device_pages=10)
    g0, v1 = running(kv, 0, prompt=8, lora_id=1), running(kv, 1, prompt=8, lora_id=2)
    out = make(kv, peft_cache=peft).schedule([g0, v1])
    assert ids(out.paused_requests) == [1] and peft.released == [1]


# -- deadlock -------------------------------------------------------------------------------------
def test_kv_exhaustion_with_nothing_to_evict_raises_a_deadlock_error_naming_the_fix():
    kv = FakeKV(num_device_blocks=3)
    g = running(kv, 0, prompt=8)
    kv.caches[0].active = False  # cannot resume: a finishing request holds the device
    holder = running(kv, 1, prompt=8)
    holder.state = RequestState.GENERATION_TO_COMPLETE
    with pytest.raises(SchedulerDeadlockError, match="host tier"):
        make(kv).schedule([holder, g])


def test_suspend_resume_ping_pong_raises_after_the_stall_limit():
    kv = FakeKV(num_device_blocks=2)
    g = running(kv, 0, prompt=8)  # alone, but can never grow past 2 blocks
    sched = make(kv)
    for _ in range(UnifiedScheduler.STALL_LIMIT - 1):
        assert ids(sched.schedule([g]).paused_requests) == [0]
    with pytest.raises(SchedulerDeadlockError):
        sched.schedule([g])


@pytest.mark.parametrize(
    "kw,inflight,drafts,pages",
    [
        ({"max_num_tokens": 2}, (), 2, None),
        ({}, (), 0, 0),
        ({}, (0,), 0, None),
    ],
    ids=["drafts-over-budget", "no-lora-pages", "all-inflight"],
)
def test_budget_stops_never_raise(kw, inflight, drafts, pages):
    kv = FakeKV(num_device_blocks=2)  # the device is also full: only the budget decides
    g = running(kv, 0, prompt=8, lora_id=1)
    g.draft_tokens = [1] * drafts
    peft = None if pages is None else FakePeft(max_device_pages=pages)
    kw.setdefault("max_batch_size", 4)
    out = UnifiedScheduler(kv, peft_cache=peft, **kw).schedule([g], inflight_request_ids=set(inflight))
    assert out.is_empty and out.paused_requests == []
    assert ("alloc", 0) not in kv.calls


# -- priority mode --------------------------------------------------------------------------------
def test_priority_mode_orders_by_priority_then_arrival_and_evicts_the_lowest():
    kv = FakeKV(num_device_blocks=6)
    low = running(kv, 0, prompt=4, priority=0)  # earliest arrival, lowest priority
    high = running(kv, 1, prompt=8, priority=5)  # 2 full blocks
    mid = running(kv, 2, prompt=4, priority=3)
    mid2 = running(kv, 3, prompt=4, priority=3)
    filler = running(kv, 4, prompt=4, priority=0)
    filler.state = RequestState.GENERATION_TO_COMPLETE  # holds the last block
    out = make(kv, priority_mode=True).schedule([low, high, mid, mid2, filler])
    assert ids(out.paused_requests)[0] == 0  # lowest priority goes first, though it arrived first
    assert ids(out.generation_requests)[:1] == [1]
    assert out.generation_requests.index(high) == 0


def test_without_priority_mode_the_list_order_rules():
    kv = FakeKV()
    reqs = [running(kv, 0, priority=0), running(kv, 1, priority=9)]
    assert ids(make(kv, max_batch_size=1).schedule(reqs).generation_requests) == [0]
    assert ids(make(kv, max_batch_size=1, priority_mode=True).schedule(reqs).generation_requests) == [1]


# -- revert of dropped requests -------------------------------------------------------------------
def test_drop_scheduled_reverts_the_growth_and_removes_the_requests():
    kv = FakeKV()
    g, c, keep = running(kv, 0), ctx(1, prompt=8), ctx(2, prompt=4)
    g_cap = kv.capacity(g)
    sched = make(kv)
    out = sched.schedule([g, c, keep])
    assert kv.capacity(g) == g_cap + 1 and kv.capacity(c) == 8
    sched.drop_scheduled(out, [g, c])
    assert kv.capacity(g) == g_cap and kv.capacity(c) == 0
    assert ids(out.context_requests) == [2] and out.generation_requests == []
    assert out.num_scheduled_tokens == 4
    assert ("revert", 0) in kv.calls and ("revert", 1) in kv.calls


# -- construction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"max_batch_size": -1},
        {"max_batch_size": 0},  # would schedule nothing, ever
        {"max_num_tokens": -5},
        {"max_num_tokens": 0},
        {"chunk_unit_size": 0},
        {"max_batch_size": 1.5},
        {"max_batch_size": True},
    ],
)
def test_bad_budgets_are_config_errors(kw):
    kw = {"max_batch_size": 4, **kw}
    name = next(iter(kw.keys() - {"max_batch_size"}), "max_batch_size")
    with pytest.raises(ConfigError, match=name):
        UnifiedScheduler(FakeKV(), **kw)


def test_make_scheduler_builds_by_name_and_rejects_unknown_kinds():
    kv = FakeKV()
    assert isinstance(make_scheduler("unified", kv, max_batch_size=4), UnifiedScheduler)
    with pytest.raises(ConfigError, match="scheduler"):
        make_scheduler("fifo", kv, max_batch_size=4)


def test_a_draft_kv_manager_is_suspended_alongside_the_main_one():
    kv, draft = FakeKV(num_device_blocks=4), FakeKV()
    g0, v1 = running(kv, 0, prompt=8), running(kv, 1, prompt=8)
    running(draft, 1, prompt=8)
    out = make(kv, draft_kv_cache_manager=draft).schedule([g0, v1])
    assert ids(out.paused_requests) == [1]
    assert ("suspend", 1) in draft.calls and not draft.is_request_active(1)


def test_drop_scheduled_with_the_real_manager_gives_the_blocks_back():
    from kvsched.core.config import CacheConfig
    from kvsched.core.kvcache import KVCacheManager
    from kvsched.core.kvcache.invariants import check_invariants
    from kvsched.core.step import apply_step

    kv = KVCacheManager(CacheConfig(tokens_per_block=4, num_device_blocks=16), storage=None)
    sched = make(kv)
    g, c = ctx(0, prompt=8), ctx(1, prompt=8)
    out = sched.schedule([g])
    apply_step(out, {0: [5]}, kv)  # g decodes from now on; its KV holds 8 tokens in 2 blocks
    free = kv.num_free_device_blocks
    out = sched.schedule([g, c])
    assert ids(out.generation_requests) == [0] and ids(out.context_requests) == [1]
    assert kv.num_free_device_blocks == free - 3
    sched.drop_scheduled(out, [g, c])
    check_invariants(kv)
    assert kv.num_free_device_blocks == free and kv.capacity(g) == 8 and kv.capacity(c) == 0
    assert out.is_empty and out.num_scheduled_tokens == 0
    out = sched.schedule([g, c])  # both come back next step
    assert ids(out.generation_requests) == [0] and ids(out.context_requests) == [1]
