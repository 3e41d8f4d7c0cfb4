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
        pool.push_cached(p)
    assert pool.available == 4 + 4
    pool.remove_cached(blocks[0])
    assert blocks[0].bucket is None and pool.num_cached == 3
    # lowest priority first, then oldest first within a priority
    assert pool.pop_victims(2) == [blocks[2], blocks[1]]
    assert pool.pop_victims(1) == [blocks[3]]
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
