from hashlib import sha256

from kvc_helpers import make, req
from kvsched.core.kvcache.blocks import Block, TierPool
from kvsched.core.kvcache.keys import block_key, chain_keys, pack_tokens, root_key


def test_root_key_depends_on_scope():
    keys = {root_key(None, None), root_key(1, None), root_key(None, 1), root_key(1, 1), root_key(2, None)}
    assert len(keys) == 5
    assert root_key(None, None) == sha256(b"\x00").digest()
    assert root_key(3, None) == sha256(b"\x01" + (3).to_bytes(8, "little")).digest()


def test_tokens_pack_as_4_byte_little_endian():
    assert pack_tokens([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"


def test_chain_keys_match_block_key_and_ignore_partial_tail():
    root = root_key(None, None)
    toks = list(range(10))
    keys = chain_keys(root, pack_tokens(toks), 4 * 4)
    assert len(keys) == 2
    assert keys[0] == block_key(root, toks[:4])
    assert keys[1] == block_key(keys[0], toks[4:8])
    assert keys[1] != block_key(root, toks[4:8])  # chained: same tokens, other parent


def test_pool_alloc_low_ids_first_and_lru_priority_order():
    pool = TierPool(0, 6)
    assert pool.alloc(2) == [0, 1]
    blocks = [Block(0, s, priority=prio) for s, prio in zip(range(4), (0, 5, 0, 5))]
    for p in blocks:
        pool.push_many([p])
    assert pool.available == 4 + 4
    pool.remove_cached(blocks[0])
    assert not blocks[0].cached and pool.num_cached == 3
    # lowest priority first, then oldest first within a priority
    assert pool.pop_victims(2) == [blocks[2], blocks[1]]
    assert pool.pop_victims(1) == [blocks[3]]
    assert pool.num_cached == 0 and not pool.buckets and pool.entries == 0


def test_a_block_taken_back_and_released_again_is_evicted_at_its_new_place():
    """Lazy deletion (blocks.py): the stale entry left by ``remove_cached`` is skipped, the block's
    fresh entry counts, as an ordered dict's delete-and-reinsert would order it."""
    pool = TierPool(0, 8)
    a, b, c = (Block(0, s) for s in range(3))
    pool.push_many([a, b, c])
    pool.remove_cached(a)  # a hit: a is held for a while ...
    pool.push_many([a])  # ... then released again: now the newest
    assert pool.num_cached == 3 and pool.entries == 4
    assert pool.cached_blocks() == [b, c, a]
    assert pool.pop_victims(2) == [b, c]
    assert pool.pop_victims(1) == [a] and pool.entries == 0 and not pool.buckets


def test_stale_entries_stay_bounded_by_compaction():
    pool = TierPool(1, 4)
    hot, cold = Block(1, 0), Block(1, 1)
    pool.push_many([cold, hot])
    for _ in range(5000):  # a hot prefix hit and released again and again, never evicted
        pool.remove_cached(hot)
        pool.push_many([hot])
    assert pool.num_cached == 2 and pool.entries <= 2 * 2 + 1024 + 1
    assert pool.cached_blocks() == [cold, hot]
    assert pool.pop_victims(2) == [cold, hot]


def test_a_block_cached_again_under_another_priority_is_not_evicted_twice():
    """Its old entry (priority 0) is still queued when it comes back under priority -1."""
    pool = TierPool(0, 4)
    a, b = Block(0, 0), Block(0, 1)
    pool.push_many([a, b])
    pool.remove_cached(a)
    a.priority = -1
    pool.push_many([a])
    assert pool.pop_victims(2) == [a, b]  # not [a, a]
    assert pool.num_cached == 0 and not pool.buckets


def test_different_lora_or_salt_never_share_blocks():
    m = make(reuse=True, device=16)
    a = req(1, list(range(9)), lora_id=1)
    b = req(2, list(range(9)), lora_id=2)
    c = req(3, list(range(9)), lora_id=1, cache_salt=5)
    d = req(4, list(range(9)), lora_id=1)
    for r in (a, b, c, d):
        assert m.prepare_context(r)
        m.resize_context(r, r.context_remaining_length)
        m.advance(r, r.context_remaining_length)
    assert (b.num_reused_tokens, c.num_reused_tokens) == (0, 0)
    assert d.num_reused_tokens == 8


def test_a_long_queue_evicts_in_order_and_cuts_its_consumed_entries():
    """Eviction takes runs of entries by slice (``LruQueue``); consumed ones are cut off the lists
    once they are most of them, and the order survives every cut."""
    pool = TierPool(0, 20000)
    blocks = [Block(0, s) for s in range(20000)]
    pool.push_many(blocks)
    queue = pool.buckets[0]
    out: list[Block] = []
    while pool.num_cached:
        out += pool.pop_victims(min(97, pool.num_cached))
        assert len(queue.blocks) - queue.head == pool.num_cached == pool.entries or not pool.num_cached
        assert len(queue.blocks) <= 2 * pool.num_cached + 4096 + 97 or not pool.num_cached
    assert out == blocks
    assert not pool.buckets and pool.entries == 0


def test_stale_entries_inside_a_run_are_skipped_and_the_rest_of_the_run_is_kept():
    pool = TierPool(0, 16)
    blocks = [Block(0, s) for s in range(8)]
    pool.push_many(blocks)
    pool.remove_cached(blocks[2])  # stale entries at positions 2 and 5
    pool.remove_cached(blocks[5])
    assert pool.pop_victims(3) == [blocks[0], blocks[1], blocks[3]]
    assert pool.pop_victims(2) == [blocks[4], blocks[6]]  # the run check fails again (entry 5)
    pool.push_many([blocks[2]])
    assert pool.pop_victims(2) == [blocks[7], blocks[2]]
    assert pool.num_cached == pool.entries == 0 and not pool.buckets
