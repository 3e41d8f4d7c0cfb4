"""Stats snapshots and a full consistency check of the manager (O(blocks); for tests and debugging)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

from kvsched.core.kvcache.block_store import BlockStore
from kvsched.core.kvcache.blocks import Block
from kvsched.core.kvcache.request_cache import RequestCache
from kvsched.core.kvcache.types import DEVICE, HOST, KVCacheStats

if TYPE_CHECKING:
    from kvsched.core.kvcache.manager import KVCacheManager


def snapshot_stats(store: BlockStore, caches: dict[int, RequestCache]) -> KVCacheStats:
    """Copy of the counters with the pool figures filled in."""
    s = dataclasses.replace(store.counters)
    d, h = store.device, store.host
    s.free_device_blocks = len(d.free)
    s.cached_device_blocks = d.num_cached
    s.used_device_blocks = d.size - len(d.free) - d.num_cached
    s.free_host_blocks = len(h.free)
    s.cached_host_blocks = h.num_cached
    s.used_host_blocks = h.size - len(h.free) - h.num_cached
    s.active_device_blocks = store.num_locked
    s.num_requests = len(caches)
    s.num_active_requests = sum(1 for c in caches.values() if c.active)
    return s


def check_invariants(manager: KVCacheManager) -> None:
    """Raise AssertionError on any leak, double ownership, bad count or stale table."""
    store: BlockStore = manager._store
    caches: dict[int, RequestCache] = manager._caches
    tpb = manager.tokens_per_block
    locks: Counter[int] = Counter()
    holds: Counter[int] = Counter()
    blocks: dict[int, Block] = {}
    for c in caches.values():
        assert 0 <= c.committed <= c.history <= c.capacity <= c.alloc_tokens, c
        assert c.alloc_tokens == len(c.blocks) * tpb, c
        assert c.committed % tpb == 0, c
        assert len({id(p) for p in c.blocks}) == len(c.blocks), f"request {c.request_id} holds a block twice"
        if c.active:
            assert c.table == [p.slot for p in c.blocks], f"stale table of request {c.request_id}"
            assert all(p.tier == DEVICE for p in c.blocks)
        else:
            assert not c.table
        for p in c.blocks:
            blocks[id(p)] = p
            (locks if c.active else holds)[id(p)] += 1
    for p in blocks.values():
        assert p.locks == locks[id(p)] and p.holds == holds[id(p)], f"bad refcount {p}"
        assert not p.cached, f"referenced block in the LRU {p}"
    assert store.num_locked == sum(1 for p in blocks.values() if p.locks), "bad locked count"
    parked = {id(p) for p in blocks.values() if p.tier == DEVICE and not p.locks and p.holds}
    assert parked == {id(p) for p in store.parked}, "parked set out of date"
    for tier, pool in ((DEVICE, store.device), (HOST, store.host)):
        cached = pool.cached_blocks()
        assert len(cached) == pool.num_cached
        for p in cached:
            assert p.tier == tier and p.key is not None and p.locks == 0 and p.holds == 0, p
            assert store.index.get(p.key) is p, f"cached block not in index {p}"
            blocks[id(p)] = p
        owned = [p.slot for p in blocks.values() if p.tier == tier]
        slots = owned + pool.free
        assert len(slots) == len(set(slots)) == pool.size, f"tier {tier}: slot leaked or owned twice"
        assert all(0 <= s < pool.size for s in slots)
    for key, p in store.index.items():
        assert p.key == key and id(p) in blocks, f"index entry for a dead block {p}"
    for p in blocks.values():  # the other way round: a key is carried only by its index entry's block
        assert p.key is None or store.index.get(p.key) is p, f"block keyed but not indexed {p}"
