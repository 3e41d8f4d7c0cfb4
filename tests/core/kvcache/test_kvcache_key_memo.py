"""Reuse key values are a contract with KV-event consumers (routers): pinned digests, and the key memo
and block splitting that make lookups fast return exactly what a fresh hash returns."""

import os
from hashlib import sha256

import pytest

from kvc_helpers import decode, make, req, run_context
from kvsched.core.kvcache import keys, prefix
from kvsched.core.kvcache.keys import KeyMemo, block_key, chain_keys, pack_tokens, root_key, split_blocks

GROUP = keys.GROUP

ROOT = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    """Each test starts from an empty memo of its own (the module one is shared by the process)."""
    memo = KeyMemo(1 << 16)
    monkeypatch.setattr(keys, "MEMO", memo)
    monkeypatch.setattr(prefix, "MEMO", memo)
    return memo


def pinned_chains() -> None:
    r = root_key(None, None)
    assert r.hex() == ROOT
    assert root_key(-1, 2**64 + 3) == sha256(b"\x03" + b"\xff" * 8 + (3).to_bytes(8, "little")).digest()
    assert root_key(7, 123456789).hex() == "de84cfd4f0f813ac707be73d148324f4285af0ad9d538bd696be6e7036bb472c"
    ks = chain_keys(r, pack_tokens(list(range(40))), 64)
    assert [k.hex() for k in ks] == [
        "089aec1b094cb2fb373e5b117d2d6f50a536ff4414bd6fe618a005431b081103",
        "5ec123a8b7e9e09df6812167fa93b44079fd4415402ca5b2cb372de5d04b737e",
    ]
    ks = chain_keys(root_key(7, 123456789), pack_tokens([50000, 1, 2**31 - 1, -5] * 8), 16)
    assert len(ks) == 8
    assert ks[-1].hex() == "0bd5875a86de9f02b0463d6fbeaede92613ba8a13fc2e3c12de6c30b6d05a82b"
    assert block_key(r, [9, 8, 7]).hex() == "dfb83f5601b867f907f439334adaa9b8712d0bc3bbe052599a9f40f558ca5226"


def _count_sha256(monkeypatch, module) -> list[bytes]:
    """Patch ``module.sha256`` to record every input it hashes; returns that record."""
    hashed: list[bytes] = []

    def counting(data):
        hashed.append(data)
        return sha256(data)

    monkeypatch.setattr(module, "sha256", counting)
    return hashed


def test_key_values_are_pinned_cold_and_from_the_memo(fresh_memo):
    pinned_chains()
    assert len(fresh_memo) == 2 + 8
    pinned_chains()  # every block now comes from the memo
    assert len(fresh_memo) == 2 + 8


def test_chain_keys_equal_the_definition_for_every_split(fresh_memo):
    parent = root_key(None, 3)
    for n_blocks in (0, 1, 63, 64, 65, 130):
        packed = os.urandom(16 * n_blocks + 7)  # a trailing partial block is ignored
        want, p = [], parent
        for i in range(n_blocks):
            p = sha256(p + packed[16 * i : 16 * i + 16]).digest()
            want.append(p)
        assert split_blocks(packed, 16) == [packed[16 * i : 16 * i + 16] for i in range(n_blocks)]
        assert chain_keys(parent, packed, 16) == want
        assert chain_keys(parent, packed, 16) == want  # from the memo


def test_a_remembered_prefix_is_not_hashed_again(monkeypatch):
    root = root_key(None, None)
    calls = _count_sha256(monkeypatch, keys)
    packed = pack_tokens(list(range(64)))
    first = chain_keys(root, packed, 64)
    assert len(calls) == 4
    assert chain_keys(root, packed, 64) == first and len(calls) == 4
    longer = chain_keys(root, pack_tokens(list(range(80))), 64)
    assert longer[:4] == first and len(calls) == 5  # only the new block is hashed


def test_whole_groups_are_one_probe_and_a_longer_prompt_hashes_only_its_new_blocks(fresh_memo, monkeypatch):
    parent = root_key(None, None)
    hashed = _count_sha256(monkeypatch, keys)
    packed = os.urandom(16 * (2 * GROUP + 8))  # two whole groups, then 8 blocks
    first = chain_keys(parent, packed, 16)
    assert len(hashed) == 2 * GROUP + 8
    assert (len(fresh_memo.groups), len(fresh_memo.recent)) == (2, 8)  # groups, then the tail singly
    assert chain_keys(parent, packed, 16) == first and len(hashed) == 2 * GROUP + 8
    longer = packed + os.urandom(16 * 10)
    assert chain_keys(parent, longer, 16)[: len(first)] == first
    assert len(hashed) == 2 * GROUP + 8 + 10  # the third group's first 8 blocks were remembered singly
    assert len(fresh_memo.groups) == 3


def test_groups_of_different_block_sizes_never_meet(fresh_memo):
    """16 blocks of 16 bytes and one block of 256 bytes hold the same data: a group entry must not
    answer the single block (nor the reverse)."""
    parent = root_key(None, 1)
    packed = os.urandom(16 * GROUP)
    small = chain_keys(parent, packed, 16)
    (big,) = chain_keys(parent, packed, 16 * GROUP)
    assert big == sha256(parent + packed).digest() and small[-1] != big
    assert chain_keys(parent, packed, 16) == small and chain_keys(parent, packed, 16 * GROUP) == [big]


def test_memo_rotates_two_generations_and_stays_bounded(monkeypatch):
    memo = KeyMemo(8)
    monkeypatch.setattr(keys, "MEMO", memo)
    parent = root_key(None, None)
    hashed = _count_sha256(monkeypatch, keys)
    first = os.urandom(16 * 6)
    first_keys = chain_keys(parent, first, 16)
    assert (len(memo.recent), len(memo.older), len(hashed)) == (6, 0, 6)
    chain_keys(parent, os.urandom(16 * 5), 16)  # 11 > 8: recent becomes older
    assert (len(memo.recent), len(memo.older), len(hashed)) == (0, 11, 11)
    assert chain_keys(parent, first, 16) == first_keys  # older hits, not hashed, move back to recent
    assert (len(memo.recent), len(memo.older), len(hashed)) == (6, 11, 11)
    chain_keys(parent, os.urandom(16 * 2), 16)
    assert (len(memo.recent), len(memo.older)) == (8, 11)  # at the size: no rotation yet
    chain_keys(parent, os.urandom(16), 16)
    assert (len(memo.recent), len(memo.older), len(memo)) == (0, 9, 9)  # past it: the 11 are forgotten
    assert chain_keys(parent, first, 16) == first_keys  # promoted ones were kept with their keys
    assert (len(memo.recent), len(memo.older), len(hashed)) == (6, 9, 14)
    packed = os.urandom(16 * 20)
    keys_once = chain_keys(parent, packed, 16)
    # 20 blocks: one group of GROUP = 16 and 4 single blocks; 10 singles + 16 > 8: rotated
    assert (len(memo.recent), len(memo.older), len(memo.older_groups), len(memo)) == (0, 10, 1, 26)
    chain_keys(parent, os.urandom(16 * 9), 16)
    assert chain_keys(parent, first, 16) == first_keys and len(hashed) == 14 + 20 + 9 + 6
    memo.clear()
    assert len(memo) == 0 and chain_keys(parent, packed, 16) == keys_once


def test_probe_and_lookup_agree_with_and_without_the_memo(fresh_memo):
    m = make(reuse=True, device=64)
    prompt = list(range(100, 141))  # 10 full blocks of 4, then one token
    a = req(1, prompt)
    assert m.prepare_context(a) and m.resize_context(a, a.context_remaining_length)
    m.advance(a, a.context_remaining_length)
    for clear in (False, True):
        if clear:
            fresh_memo.clear()
            assert m.probe_reuse(req(9, prompt[:30] + [7, 7, 7])) == 28
            assert len(fresh_memo) == 8  # the 7 hits and the first miss are remembered
        assert m.probe_reuse(req(9, prompt[:30] + [7, 7, 7])) == 28
        assert m.probe_reuse(req(9, [5] + prompt)) == 0
        b = req(2 + clear, prompt[:25] + [1])
        assert m.prepare_context(b) and b.num_reused_tokens == 24
        m.free_request(b)


def test_generated_blocks_are_remembered_at_publish(fresh_memo):
    m = make(reuse=True, device=16)
    a = req(1, list(range(8)), max_new=9)
    run_context(m, a)  # output token 7 appended; 8 tokens of KV, two full blocks published
    before = len(fresh_memo)
    for t in (50, 51, 52, 53):  # KV of 7, 50, 51, 52 fills the third block
        assert decode(m, a, t)
    assert len(fresh_memo) == before + 1
    (data,) = [d for d in fresh_memo.recent if d.endswith(pack_tokens([7, 50, 51, 52]))]
    assert fresh_memo.recent[data] == sha256(data).digest()
    assert m._store.index[fresh_memo.recent[data]].key == fresh_memo.recent[data]


def test_probe_hashes_only_what_the_memo_lacks(fresh_memo, monkeypatch):
    m = make(reuse=True, device=64)
    prompt = list(range(100, 141))  # 10 full blocks of 4, then one token
    run_context(m, req(1, prompt))
    probe = req(9, prompt[:30] + [7, 7, 7])  # 7 published blocks, then a miss
    fresh_memo.clear()
    fresh_memo.size = 8
    hashed = _count_sha256(monkeypatch, prefix)
    assert m.probe_reuse(probe) == 28 and len(hashed) == 8  # 7 hits and the first miss
    assert (len(fresh_memo.recent), len(fresh_memo.older)) == (8, 0)  # at the size: kept
    assert all(sha256(d).digest() == k for d, k in fresh_memo.recent.items())
    assert m.probe_reuse(probe) == 28 and len(hashed) == 8  # all remembered
    fresh_memo.rotate()
    assert m.probe_reuse(probe) == 28 and len(hashed) == 8  # the older generation answers
    assert (len(fresh_memo.recent), len(fresh_memo.older)) == (8, 8)
    # one more published block and a miss: two new hashes, 10 > 8 remembered pairs: rotated
    assert m.probe_reuse(req(10, prompt[:32] + [5, 5, 5, 5, 5])) == 32 and len(hashed) == 10
    assert (len(fresh_memo.recent), len(fresh_memo.older)) == (0, 10)


def test_match_prefix_returns_the_published_blocks_and_the_last_key():
    m = make(reuse=True, device=64)
    prompt = list(range(100, 141))
    run_context(m, req(1, prompt))
    root = root_key(None, None)
    chain = chain_keys(root, pack_tokens(prompt[:40]), 16)
    blocks, last = prefix.match_prefix(m._store.index, root, prompt[:30] + [7, 7], 4)
    assert blocks == [m._store.index[k] for k in chain[:7]] and last == chain[6]
    assert prefix.match_prefix(m._store.index, root, [1, 2, 3, 4], 4) == ([], root)


def test_several_blocks_hashed_in_one_commit_publish_in_order_with_parents(fresh_memo):
    """Accepted draft tokens can complete more than one block in one advance; a 3-token prompt has no
    looked-up key, so its first block is hashed at commit and its event has no parent."""
    m = make(reuse=True, device=16)
    r = req(1, [1, 2, 3], max_new=20)
    run_context(m, r)  # output token 7: 4 tokens, KV of 3
    assert len(fresh_memo) == 0
    fresh_memo.size = 3
    r.draft_tokens = list(range(10, 21))
    assert m.try_allocate_generation(r)
    r.output_token_ids += list(range(10, 22))
    r.draft_tokens = []
    m.advance(r, 12)  # KV of 15 tokens: blocks 0, 1 and 2 complete in this one commit
    chain = chain_keys(root_key(None, None), pack_tokens([1, 2, 3, 7, *range(10, 18)]), 16)
    assert [m._store.index[k].slot for k in chain] == m.block_table(r)[:3]
    stored = [(e.block_hash, e.parent_hash) for e in m.drain_events() if e.kind == "stored"]
    assert stored == [(chain[0], None), (chain[1], chain[0]), (chain[2], chain[1])]
    assert (len(fresh_memo.recent), len(fresh_memo.older)) == (3, 0)  # at the size: not rotated


def test_looked_up_blocks_are_published_without_hashing_again(monkeypatch):
    hashed = _count_sha256(monkeypatch, prefix)
    m = make(reuse=True, device=16)
    r = req(1, list(range(9)))  # keys of blocks 0 and 1 are computed at lookup
    run_context(m, r)
    assert hashed == [] and len(m._store.index) == 2
    for t in (20, 21, 22):
        assert decode(m, r, t)  # the KV of 8, 7, 20, 21 completes block 2: hashed at commit
    assert len(hashed) == 1 and len(m._store.index) == 3


def test_a_private_duplicate_stays_private_when_the_published_one_is_dropped():
    """Two requests look up the same prompt before either computes it: the first to commit
    publishes, the other's copies stay private, and stay so even once the published ones are gone;
    its later blocks are published (module docstring of prefix.py)."""
    m = make(reuse=True, device=16)
    prompt = list(range(100, 113))  # 3 full blocks of 4, then one token
    a, b = req(1, prompt), req(2, prompt)
    assert m.prepare_context(a) and m.prepare_context(b)
    assert m.resize_context(a, 13) and m.resize_context(b, 8)
    m.advance(a, 13)
    a.context_current_position = 13
    m.advance(b, 8)  # b's blocks 0 and 1: keys already held by a's blocks
    b.context_current_position = 8
    chain = chain_keys(root_key(None, None), pack_tokens(prompt[:12]), 16)
    b_blocks = m._caches[2].blocks
    assert [m._store.index[k] for k in chain[:2]] != b_blocks[:2]
    m.free_request(a)
    assert m.clear_cached_blocks() == 3 and not m._store.index  # a's published blocks are gone
    assert m.resize_context(b, 5)
    m.advance(b, 5)
    assert list(m._store.index) == [chain[2]]  # b's block 2 only: 0 and 1 stay private
    assert m._store.index[chain[2]] is b_blocks[2] and b_blocks[0].key is None


def test_a_probe_finds_a_looked_up_prompt_in_the_memo_groups_without_hashing(fresh_memo, monkeypatch):
    """The lookup remembers a prompt's aligned runs of ``GROUP`` blocks as group entries only; the
    probe walks the same memo (``keys.known_keys``), so nothing is hashed again."""
    m = make(reuse=True, device=64)
    prompt = list(range(100, 100 + 4 * (2 * GROUP + 3) + 1))  # two groups and three blocks of 4, + 1
    run_context(m, req(1, prompt))
    assert len(fresh_memo.groups) == 2
    root = root_key(None, None)
    hashed = (_count_sha256(monkeypatch, prefix), _count_sha256(monkeypatch, keys))
    assert m.probe_reuse(req(2, prompt)) == 4 * (2 * GROUP + 3) and hashed == ([], [])
    blocks, _ = prefix.match_prefix(m._store.index, root, prompt, 4)
    assert len(blocks) == 2 * GROUP + 3 and hashed == ([], [])
