"""Prefix reuse: matching, sharing, eviction order, the host tier, events, stats."""

import pytest

from kvc_helpers import decode, make, req, run_context
from kvsched.core.kvcache import Tier
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.types import KVEvent


def test_lookup_uses_prompt_minus_last_token():
    m = make(tpb=4, device=16, reuse=True)
    a = req(1, list(range(9)))
    run_context(m, a)
    assert m.committed(a) == 8
    m.free_request(a)
    b = req(2, list(range(9)))  # lookup 8 tokens: 2 blocks
    assert m.prepare_context(b)
    assert (b.context_current_position, b.num_reused_tokens) == (8, 8)
    assert b.is_first_context_chunk and b.context_remaining_length == 1
    c = req(3, list(range(8)))  # lookup 7 tokens: 1 block, the last one is recomputed
    assert m.prepare_context(c)
    assert c.context_current_position == 4
    check_invariants(m)


def test_prefix_shorter_than_a_block_is_not_reused():
    m = make(tpb=4, device=16, reuse=True)
    run_context(m, req(1, list(range(9))))
    r = req(2, [0, 1, 2, 99])
    assert m.prepare_context(r) and r.context_current_position == 0
    s = m.stats()
    assert s.reuse_miss_blocks == 2 and s.reuse_miss_tokens == 9 + 4  # the first request's 2 blocks


def test_shared_blocks_are_refcounted_not_copied():
    m = make(tpb=4, device=8, reuse=True)
    a = req(1, list(range(9)), max_new=2)
    run_context(m, a)
    b = req(2, list(range(8)) + [50, 51], max_new=2)
    run_context(m, b)
    assert m.block_table(b)[:2] == m.block_table(a)[:2]
    assert m.block_table(b)[2] != m.block_table(a)[2]
    assert m.num_free_device_blocks == 8 - 4
    m.free_request(a)
    assert m.num_free_device_blocks == 8 - 3  # a's shared blocks stay held by b; its tail is cached
    check_invariants(m)
    m.free_request(b)
    assert m.num_free_device_blocks == 8
    s = m.stats()
    assert (s.cached_device_blocks, s.used_device_blocks) == (2, 0)  # partial tail blocks are freed
    assert s.reuse_hit_blocks_device == 2 and s.reuse_hit_tokens == 8


def test_generated_blocks_are_committed_and_reused_by_the_next_turn():
    m = make(tpb=4, device=16, reuse=True)
    a = req(1, list(range(6)), max_new=8)
    run_context(m, a)
    for t in range(5):
        assert decode(m, a, token=40 + t)
    assert m.history(a) == 11 and m.committed(a) == 8
    turn2 = req(2, a.prompt_token_ids + a.output_token_ids + [77])
    m.free_request(a)
    assert m.prepare_context(turn2)
    assert turn2.context_current_position == 8


def test_commit_waits_for_tokens_that_are_not_appended_yet():
    m = make(tpb=4, device=16, reuse=True)
    a = req(1, list(range(3)), max_new=8)
    run_context(m, a)  # history 3, 4 tokens known
    a.draft_tokens = [5, 6, 7]
    assert m.try_allocate_generation(a)
    m.advance(a, 4)  # last token + 3 accepted drafts written; drafts not appended yet
    assert m.history(a) == 7 and m.committed(a) == 4
    a.output_token_ids += [5, 6, 7, 8]
    a.draft_tokens = []
    assert m.try_allocate_generation(a)
    m.advance(a, 1)  # the bonus token's KV: block 1 is full and its tokens are known
    assert m.committed(a) == 8
    m.free_request(a)
    b = req(2, [0, 1, 2, 7, 5, 6, 7, 8, 9])
    assert m.prepare_context(b) and b.context_current_position == 8


def test_recomputed_request_looks_up_prompt_plus_outputs():
    m = make(tpb=4, device=16, reuse=True)
    a = req(1, list(range(5)), max_new=8)
    run_context(m, a)
    for t in range(4):
        decode(m, a, token=60 + t)
    m.free_request(a)
    a.reset_for_recompute()
    assert a.num_context_tokens == 10
    assert m.prepare_context(a)
    assert a.context_current_position == 8 and a.num_reused_tokens == 8


def test_eviction_is_lru_and_tail_blocks_go_first():
    m = make(tpb=4, device=4, reuse=True)
    a = req(1, list(range(9)), max_new=1)  # 3 blocks, 2 published
    run_context(m, a)
    m.free_request(a)
    m.drain_events()
    b = req(2, [90] * 13, max_new=1)  # needs 4 blocks: evicts both cached blocks, tail first
    assert m.prepare_context(b) and m.resize_context(b, 13)
    events = m.drain_events()
    removed = [e for e in events if e.kind == "removed"]
    assert len(removed) == 2 and all(e.tier == Tier.DEVICE for e in removed)
    stored_a = [e.block_hash for e in removed]
    # the second block (the tail) was evicted before the first
    assert stored_a[0] != stored_a[1]
    m.free_request(b)
    c = req(3, list(range(9)))
    assert m.prepare_context(c) and c.context_current_position == 0
    assert m.stats().dropped_device_blocks == 2


def test_tail_eviction_keeps_a_usable_prefix():
    m = make(tpb=4, device=4, reuse=True)
    a = req(1, list(range(13)), max_new=1)  # 3 published blocks + 1 private
    run_context(m, a)
    m.free_request(a)
    b = req(2, [90] * 5, max_new=1)  # needs 2 blocks: 1 free + 1 evicted (a's tail)
    run_context(m, b)
    c = req(3, list(range(13)))
    assert m.prepare_context(c) and c.context_current_position == 8


def test_retention_priority_protects_blocks():
    m = make(tpb=4, device=4, reuse=True)
    hi = req(1, list(range(5)), max_new=1, priority=5)
    lo = req(2, list(range(50, 55)), max_new=1, priority=0)
    run_context(m, hi)
    run_context(m, lo)
    m.free_request(lo)
    m.free_request(hi)  # hi is the most recent AND high priority; lo goes first either way
    x = req(3, [90] * 9, max_new=1)
    run_context(m, x)  # 3 blocks: 2 free + 1 evicted
    m.free_request(x)
    assert m.prepare_context(req(4, list(range(5))))
    lo2 = req(5, list(range(50, 55)))
    assert m.prepare_context(lo2) and lo2.context_current_position == 0


def test_priority_beats_recency():
    m = make(tpb=4, device=3, reuse=True)
    hi = req(1, list(range(5)), max_new=1, priority=9)
    run_context(m, hi)
    m.free_request(hi)  # cached first (older), but high priority
    lo = req(2, list(range(50, 55)), max_new=1)
    run_context(m, lo)
    m.free_request(lo)
    x = req(3, [90] * 5, max_new=1)  # 2 blocks: 1 free + 1 evicted -> lo's block
    run_context(m, x)
    h2 = req(4, list(range(5)))
    assert m.prepare_context(h2) and h2.context_current_position == 4


def test_evicted_blocks_move_to_host_and_come_back():
    m = make(tpb=4, device=3, host=4, reuse=True)
    a = req(1, list(range(9)), max_new=1)
    run_context(m, a)
    m.free_request(a)  # 2 cached device blocks
    m.drain_events()
    x = req(2, [90] * 12, max_new=1)
    run_context(m, x)  # needs all 3 device blocks: both cached blocks offloaded
    s = m.stats()
    assert s.cached_host_blocks == 2 and s.offload_blocks == 2 and s.dropped_device_blocks == 0
    ev = m.drain_events()
    moved = [e for e in ev if e.tier == Tier.HOST or e.kind == "removed"]
    assert (
        sorted((e.kind, e.tier) for e in moved)
        == [("removed", Tier.DEVICE)] * 2 + [("stored", Tier.HOST)] * 2
    )
    m.free_request(x)
    b = req(3, list(range(9)))
    assert m.prepare_context(b)
    assert b.context_current_position == 8
    s = m.stats()
    assert s.reuse_hit_blocks_host == 2 and s.onboard_blocks == 2
    assert s.offload_blocks == 4 and s.cached_host_blocks == 2  # made room: x's cached blocks went down
    check_invariants(m)


def test_host_tier_full_drops_oldest_host_blocks():
    m = make(tpb=4, device=2, host=1, reuse=True)
    for rid, base in ((1, 0), (2, 100)):
        r = req(rid, list(range(base, base + 5)), max_new=1)
        run_context(m, r)
        m.free_request(r)
    x = req(3, [90] * 8, max_new=1)
    run_context(m, x)  # request 2 pushed request 1's block to the host; now the host drops it
    s = m.stats()
    assert s.cached_host_blocks == 1 and s.dropped_host_blocks == 1 and s.offload_blocks == 2
    m.free_request(x)
    older = req(5, list(range(5)))
    assert m.prepare_context(older) and older.context_current_position == 0
    newer = req(4, list(range(100, 105)))
    assert m.prepare_context(newer) and newer.context_current_position == 4


@pytest.mark.parametrize("events", [True, False])
def test_concurrent_identical_blocks_keep_one_published_copy(events):
    """Without events, ``commit_blocks`` publishes a looked-up run in one pass when none of its
    keys is taken, else block by block: b's blocks stay private either way."""
    m = make(tpb=4, device=8, reuse=True, enable_kv_events=events)
    a, b = req(1, list(range(9))), req(2, list(range(9)))
    assert m.prepare_context(a) and m.prepare_context(b)  # neither sees the other yet
    for r in (a, b):
        m.resize_context(r, 9)
        m.advance(r, 9)
    assert m.block_table(a)[0] != m.block_table(b)[0]
    published = m._store.index
    assert len(published) == 2 and {id(p) for p in published.values()} == {
        id(p) for p in m._caches[1].blocks[:2]
    }
    check_invariants(m)
    m.free_request(a)
    m.free_request(b)
    s = m.stats()
    assert s.cached_device_blocks == 2 and s.free_device_blocks == 6
    check_invariants(m)


def test_stored_events_chain_parents():
    m = make(tpb=2, device=8, reuse=True)
    r = req(1, [1, 2, 3, 4, 5])
    run_context(m, r)
    ev = m.drain_events()
    assert [e.kind for e in ev] == ["stored", "stored"]
    assert ev[0].parent_hash is None and ev[1].parent_hash == ev[0].block_hash
    assert isinstance(ev[0], KVEvent) and ev[0].tier == Tier.DEVICE
    assert m.drain_events() == []
    assert m.stats().num_events == 2


def test_probe_reuse_holds_nothing_and_clear_drops_the_cache():
    m = make(tpb=4, device=8, host=4, reuse=True)
    a = req(1, list(range(9)), max_new=1)
    run_context(m, a)
    probe = req(2, list(range(9)))
    assert m.probe_reuse(probe) == 8 and not m.has_request(2)
    assert m.probe_reuse(req(3, list(range(9)), lora_id=4)) == 0
    assert make(reuse=False).probe_reuse(probe) == 0
    assert m.clear_cached_blocks() == 0  # a still holds its blocks
    m.free_request(a)
    m.drain_events()
    assert m.clear_cached_blocks() == 2
    assert [e.kind for e in m.drain_events()] == ["removed", "removed"]
    assert m.probe_reuse(probe) == 0 and m.num_free_device_blocks == 8
    check_invariants(m)
