"""Fast paths: events off, lookup keys hashed once per request, reuse counted once per admission."""

import pytest

import kvsched.core.kvcache.lifecycle as lifecycle
from kvc_helpers import decode, make, req, run_context
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.keys import chain_keys, pack_tokens, root_key


def _churn(m):
    """Contexts that share a prefix, overflow the device (offload to host, host drops), then finish."""
    shared = list(range(8))
    tables = []
    for rid in range(1, 11):
        r = req(rid, shared + [rid * 10 + k for k in range(6)], max_new=3)
        run_context(m, r)
        assert decode(m, r, token=rid)
        tables.append(m.block_table(r))
        m.free_request(r)
        check_invariants(m)
    return tables


def test_events_off_builds_no_events_and_changes_nothing_else():
    on = make(tpb=4, device=5, host=2, reuse=True)
    off = make(tpb=4, device=5, host=2, reuse=True, enable_kv_events=False)
    assert _churn(on) == _churn(off)
    s_on, s_off = on.stats(), off.stats()
    assert s_on.num_events > 0 and on.drain_events()
    assert s_off.num_events == 0 and off.drain_events() == []
    assert s_on.dropped_host_blocks > 0 and s_on.offload_blocks > 0  # the churn did evict
    s_on.num_events = 0
    assert s_on == s_off


def test_refused_first_chunk_is_counted_once_when_admitted():
    m = make(tpb=4, device=4, reuse=True)
    a = req(1, list(range(9)), max_new=2)
    run_context(m, a)  # 3 blocks locked, the first 2 published
    b = req(2, list(range(8)) + list(range(50, 58)), max_new=1)  # 16 tokens: 2 hit blocks + 2 new ones
    for _ in range(3):  # admitted by prepare, then refused by resize: the prefix is let go
        assert m.prepare_context(b)
        assert not m.resize_context(b, b.context_remaining_length)
        assert b.context_current_position == 0
    s = m.stats()
    assert (s.reuse_hit_blocks, s.reuse_miss_blocks, s.reuse_miss_tokens) == (0, 2, 9)  # a's lookup only
    m.free_request(a)
    assert m.prepare_context(b) and m.resize_context(b, b.context_remaining_length)
    s = m.stats()
    assert s.reuse_hit_blocks_device == 2 and s.reuse_hit_tokens == 8
    assert (s.reuse_miss_blocks, s.reuse_miss_tokens) == (2 + 1, 9 + 8)
    check_invariants(m)


def test_lookup_keys_are_hashed_once_per_request(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(1)
        return chain_keys(*args)

    monkeypatch.setattr(lifecycle, "chain_keys", counting)
    m = make(tpb=4, device=4, reuse=True)
    a = req(1, list(range(9)), max_new=2)
    run_context(m, a)
    b = req(2, list(range(8)) + list(range(50, 58)), max_new=1)
    for _ in range(3):
        assert m.prepare_context(b)
        assert not m.resize_context(b, b.context_remaining_length)
    assert len(calls) == 2  # one per request, however often b is looked up again


def test_commit_publishes_the_lookup_keys():
    m = make(tpb=4, device=8, reuse=True)
    prompt = list(range(13))
    r = req(1, prompt, max_new=2)
    run_context(m, r)
    stored = [e.block_hash for e in m.drain_events() if e.kind == "stored"]
    assert stored == chain_keys(root_key(None, None), pack_tokens(prompt[:12]), 16)
    m.free_request(r)
    again = req(2, prompt)
    assert m.prepare_context(again) and again.context_current_position == 12


def test_recycled_block_objects_start_clean():
    """Dropped and freed Block objects are reused for new blocks: no stale lock, key or LRU entry."""
    m = make(tpb=4, device=4, host=0, reuse=True)
    a = req(1, list(range(13)), max_new=1)
    run_context(m, a)
    old = {id(p) for p in m._store.index.values()}
    m.free_request(a)  # 3 published blocks cached, the partial tail freed
    b = req(2, [90 + k for k in range(16)], max_new=1)
    run_context(m, b)  # needs all 4 blocks: the 3 cached ones are dropped (no host tier)
    blocks = m._caches[2].blocks
    assert old & {id(p) for p in blocks}  # objects were reused
    assert [p.slot for p in blocks] == m.block_table(b)
    assert all(p.locks == 1 and p.holds == 0 and not p.cached for p in blocks)
    assert sum(p.key is not None for p in blocks) == 4  # b's own 4 full blocks, published anew
    check_invariants(m)
    m.free_request(b)
    assert m.stats().cached_device_blocks == 4
    check_invariants(m)


def _mixed(m, fills):
    """Prefix hits of every kind: cached device blocks, blocks an active request locks, blocks
    suspended requests park on the device or keep on the host, cached host blocks; a snapshot of
    tables, counters, positions, each tier's LRU order and the parked blocks' order after each."""
    shared = list(range(12))
    snaps = []

    def snap(*rs):
        check_invariants(m)
        tables = [m.block_table(r) if m.is_request_active(r.request_id) else None for r in rs]
        store = m._store
        lru = [[(p.slot, p.key) for p in pool.cached_blocks()] for pool in (store.device, store.host)]
        parked = [p.slot for p in store.parked]  # oldest first: the order they go to the host
        snaps.append((tables, m.stats(), [r.context_current_position for r in rs], lru, parked))

    a = req(1, shared + [50], max_new=4)
    run_context(m, a)
    m.free_request(a)  # 3 cached device blocks
    b = req(2, shared + [60], max_new=4)
    run_context(m, b)  # hits the cached ones
    c = req(3, shared + [70], max_new=4)
    run_context(m, c)  # hits blocks b locks
    snap(b, c)
    m.suspend_request(b)  # its own block to the host
    m.suspend_request(c)  # the shared ones are c's alone now: one more to the host, the rest parked
    d = req(4, shared + [80, 81, 82, 83, 84], max_new=2)
    run_context(m, d)  # blocks parked (or on the host) from the first: held, then resumed
    snap(b, c, d)
    for r in (b, c, d):
        m.free_request(r)
    for i in range(fills):  # other prompts push the cached prefix's tail down to the host tier
        r = req(10 + i, [200 + 20 * i + k for k in range(9)], max_new=1)
        run_context(m, r)
        m.free_request(r)
    e = req(5, shared + [90], max_new=2)
    run_context(m, e)  # head on the device, tail on the host: locked, then held, then resumed
    snap(e)
    return snaps


@pytest.mark.parametrize("host", [1, 2])  # 1: the suspended ones park everything; 2: some go down
def test_locking_in_the_lookup_pass_ends_where_hold_then_resume_ends(monkeypatch, host):
    """With no usage cap a fresh cache's prefix is locked in the lookup's pass (lock_prefix); it
    must leave every count, table and LRU order exactly as holding then resuming does."""
    fast = _mixed(make(tpb=4, device=6, host=host, reuse=True), 2)
    real = lifecycle.attach_prefix

    def hold_only(*args):
        return real(*args[:6], False)

    monkeypatch.setattr("kvsched.core.kvcache.manager.attach_prefix", hold_only)
    slow = _mixed(make(tpb=4, device=6, host=host, reuse=True), 2)
    assert fast == slow
    s = fast[-1][1]
    assert s.reuse_hit_blocks_host > 0 and s.reuse_hit_blocks_device > 0 and s.num_suspends == 2
