"""KV manager edges: revert bounds, the last-token rule of probe_reuse, prefix matching that stops at
the first missing block, resume exactly at the usage limit, and the host/drop split of an eviction."""

from __future__ import annotations

import pytest

from kvc_helpers import make, req, run_context
from kvsched.core.errors import UnknownRequestError
from kvsched.core.kvcache.invariants import check_invariants


def test_revert_to_a_capacity_above_history_keeps_that_capacity_and_its_blocks():
    m = make(tpb=4, device=8)
    r = req(1, 5, max_new=20)
    run_context(m, r)  # history 5, capacity 5 (2 blocks)
    r.draft_tokens = [1] * 10
    assert m.try_allocate_generation(r)  # capacity 16: 4 blocks
    assert m.capacity(r) == 16 and m.num_free_device_blocks == 4
    m.revert(r, 9)  # above history 5: shrink to 9 tokens, 3 blocks
    assert m.capacity(r) == 9 and len(m.block_table(r)) == 3
    assert m.num_free_device_blocks == 5
    check_invariants(m)
    m.revert(r, 2)  # below history: never under what was written
    assert m.capacity(r) == 5 and len(m.block_table(r)) == 2
    assert m.num_free_device_blocks == 6
    check_invariants(m)


def test_revert_to_a_capacity_above_the_current_one_changes_nothing():
    m = make(tpb=4, device=8)
    r = req(1, 5, max_new=20)
    run_context(m, r)
    table = m.block_table(r)
    m.revert(r, 40)
    assert m.capacity(r) == 5 and m.block_table(r) == table and m.num_free_device_blocks == 6
    r.draft_tokens = [1, 1, 1]  # the request can still grow as usual
    assert m.try_allocate_generation(r) and m.capacity(r) == 9
    check_invariants(m)


def test_revert_keeps_the_slack_of_the_last_block_usable():
    m = make(tpb=4, device=8)
    r = req(1, 5, max_new=20)
    run_context(m, r)
    r.draft_tokens = [1] * 6
    assert m.try_allocate_generation(r)  # capacity 12: 3 blocks
    m.revert(r, 6)  # 2 blocks kept; tokens 6..8 fit them without a new block
    r.draft_tokens = [1, 1]
    free = m.num_free_device_blocks
    assert m.try_allocate_generation(r) and m.capacity(r) == 8
    assert m.num_free_device_blocks == free


def test_revert_of_an_unknown_request_is_an_error():
    with pytest.raises(UnknownRequestError):
        make().revert(req(9, 4), 0)


def test_probe_reuse_leaves_the_last_token_of_a_block_aligned_prompt_out():
    m = make(tpb=4, device=16, reuse=True)
    prompt = list(range(8))
    a = req(1, prompt + [50])
    run_context(m, a)  # publishes blocks 0..3 and 4..7
    m.free_request(a)
    same = req(2, prompt)  # 8 tokens, block aligned: the last token must be computed again
    assert m.probe_reuse(same) == 4
    assert m.probe_reuse(req(3, prompt + [50])) == 8
    assert m.probe_reuse(req(4, prompt[:4])) == 0
    assert m.prepare_context(same) and same.num_reused_tokens == 4  # the lookup agrees
    assert not m.has_request(3)  # probing holds nothing
    assert make(tpb=4, device=16, reuse=False).probe_reuse(req(5, prompt)) == 0


def test_prefix_matching_stops_at_the_first_missing_block_of_a_chain():
    # Block 2 of a cached 3-block chain is evicted while blocks 1 and 3 stay cached. A request with the
    # same prompt may reuse block 1 only: block 3 without block 2 would sit at the wrong position.
    m = make(tpb=4, device=4, host=0, reuse=True)
    prompt = list(range(12)) + [99]  # 3 full blocks + 1 token
    x = req(1, prompt, max_new=1, priority=10)
    run_context(m, x)
    m.free_request(x)  # blocks 1..3 cached at priority 10, 1 slot free
    z = req(2, prompt[:8] + [77], max_new=1)  # reuses blocks 1 and 2, released again at priority 0
    run_context(m, z)
    assert z.num_reused_tokens == 8
    m.free_request(z)
    w = req(3, 8, max_new=1)  # 2 blocks: the free slot + one eviction (block 2: priority 0, oldest)
    assert m.prepare_context(w) and m.resize_context(w, 8)
    assert m.stats().dropped_device_blocks == 1
    y = req(4, prompt, max_new=1)
    assert m.probe_reuse(y) == 4
    assert m.prepare_context(y)
    assert (y.num_reused_tokens, y.context_current_position) == (4, 4)
    assert len(m.block_table(y)) == 1
    check_invariants(m)


def test_resume_is_allowed_at_exactly_the_usage_limit_and_refused_above_it():
    m = make(tpb=4, device=4, host=4, max_util_for_resume=0.5)
    s = req(1, 3, max_new=2)
    run_context(m, s)
    m.suspend_request(s)
    a = req(2, 7, max_new=2)
    run_context(m, a)  # 2 of 4 device blocks used: usage 0.5, exactly the limit
    assert m.try_allocate_generation(s) and m.is_request_active(1)
    m.suspend_request(s)
    b = req(3, 3, max_new=2)
    run_context(m, b)  # 3 of 4 used: 0.75 > 0.5
    assert not m.try_allocate_generation(s) and not m.is_request_active(1)
    assert not m.prepare_context(s)
    check_invariants(m)


def test_eviction_moves_every_victim_to_the_host_when_it_has_more_room_than_needed():
    m = make(tpb=4, device=4, host=3, reuse=True)
    prompt = list(range(8)) + [99]
    x = req(1, prompt, max_new=1)
    run_context(m, x)
    m.free_request(x)  # 2 cached device blocks, 2 free
    w = req(2, 16, max_new=1)  # all 4 device blocks: 2 victims, the host has room for 3
    run_context(m, w)
    s = m.stats()
    assert (s.offload_blocks, s.dropped_device_blocks, s.cached_host_blocks) == (2, 0, 2)
    m.free_request(w)
    y = req(3, prompt, max_new=1)
    assert m.prepare_context(y) and y.num_reused_tokens == 8
    assert m.stats().reuse_hit_blocks_host == 2
    check_invariants(m)


def test_eviction_splits_victims_between_host_room_and_drops():
    m = make(tpb=4, device=4, host=1, reuse=True)
    prompt = list(range(8)) + [99]
    x = req(1, prompt, max_new=1)
    run_context(m, x)
    m.free_request(x)
    w = req(2, 16, max_new=1)
    run_context(m, w)
    s = m.stats()
    # The older victim (the tail block) is dropped, the newer one (the head block) goes to the host.
    assert (s.offload_blocks, s.dropped_device_blocks, s.cached_host_blocks) == (1, 1, 1)
    m.free_request(w)
    y = req(3, prompt, max_new=1)
    assert m.prepare_context(y) and y.num_reused_tokens == 4
    check_invariants(m)
