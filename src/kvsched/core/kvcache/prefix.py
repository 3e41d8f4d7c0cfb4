"""Prefix reuse: match a prompt against published blocks, take (hold or lock) the matched ones, and
publish a request's newly full blocks.

Only whole blocks are keyed and shared, so a reused block is never written again (no copy-on-write).
When a request completes a block whose key another block already holds (two requests computed the
same prefix at the same time), its own copy stays private and unpublished; the chain continues.
"""

from __future__ import annotations

import functools
import struct
from hashlib import sha256

from kvsched.core.kvcache.block_store import BlockStore
from kvsched.core.kvcache.blocks import Block
from kvsched.core.kvcache.keys import MEMO, known_keys, pack_tokens
from kvsched.core.kvcache.request_cache import RequestCache
from kvsched.core.request import Request


def match_prefix(
    index: dict[bytes, Block], parent: bytes, tokens: list[int], tokens_per_block: int
) -> tuple[list[Block], bytes]:
    """Blocks of the longest run of whole blocks of ``tokens`` that is published, and the last key.

    The keys the memo remembers first (``keys.known_keys``: a probe per remembered group or block),
    then block by block, hashed and remembered, up to the first block that is not published: past
    what the memo knows, a cold prompt costs one hash.
    """
    block_bytes = tokens_per_block * 4
    packed = pack_tokens(tokens)
    known, _ = known_keys(parent, packed, block_bytes)
    blocks: list[Block] = []
    get = index.get
    memo = MEMO
    for key in known:
        block = get(key)
        if block is None:
            memo.trim()
            return blocks, parent
        blocks.append(block)
        parent = key
    recent = memo.recent
    for offset in range(len(known) * block_bytes, len(packed) // block_bytes * block_bytes, block_bytes):
        data = parent + packed[offset : offset + block_bytes]
        key = recent[data] = sha256(data).digest()
        block = get(key)
        if block is None:
            break
        blocks.append(block)
        parent = key
    memo.trim()
    return blocks, parent


def hold_prefix(store: BlockStore, keys: list[bytes]) -> tuple[list[Block], int]:
    """Hold the blocks of the longest run of ``keys`` that is published; returns them and how
    many are on the host tier. One pass: look up, take out of the LRU (lazily, see
    ``blocks.TierPool``), hold; it runs per block of a long prompt."""
    get = store.index.get
    blocks: list[Block] = []
    append = blocks.append
    on_host = cached_device = cached_host = 0
    for key in keys:
        p = get(key)
        if p is None:
            break
        if p.tier:
            on_host += 1
            if p.stamp >= 0:
                p.stamp = -1
                cached_host += 1
        elif p.stamp >= 0:
            p.stamp = -1
            cached_device += 1
        p.holds += 1
        append(p)
    store.device.num_cached -= cached_device
    store.host.num_cached -= cached_host
    return blocks, on_host


def lock_prefix(store: BlockStore, keys: list[bytes]) -> tuple[list[Block], int, bool]:
    """``hold_prefix`` and ``lifecycle.resume_cache``'s locking in one pass, for a fresh cache
    whose resume cannot be refused (no usage cap): device blocks no suspended request parks
    are locked at once; returns (blocks, 0, True). At the first other block (on the host, or
    parked) the ones locked so far turn into holds and the rest is held as ``hold_prefix``
    holds it: (blocks, on_host, False), and ``resume_cache`` does the rest as usual."""
    get = store.index.get
    parked = store.parked
    blocks: list[Block] = []
    append = blocks.append
    newly_locked = cached = 0
    for key in keys:
        p = get(key)
        if p is None:
            break
        if p.tier or (parked and p in parked):
            for q in blocks:
                q.locks -= 1
                q.holds += 1
            store.device.num_cached -= cached
            rest, on_host = hold_prefix(store, keys[len(blocks) :])
            return blocks + rest, on_host, False
        if p.stamp >= 0:
            p.stamp = -1
            cached += 1
        if not p.locks:
            newly_locked += 1
        p.locks += 1
        append(p)
    store.device.num_cached -= cached
    store.num_locked += newly_locked
    return blocks, 0, True


def commit_blocks(store: BlockStore, cache: RequestCache, req: Request, tokens_per_block: int) -> None:
    """Publish every block that became full since the last commit and whose tokens are known.

    Tokens of accepted draft tokens may be written to KV before they are appended to the request, so
    only ``min(history, req.num_tokens)`` tokens count; a later call catches up. Usually one block:
    packed with a precompiled struct and hashed in one call (same digest as ``keys.chain_keys``).
    """
    start = cache.committed
    end = min(cache.history, req.num_tokens) // tokens_per_block * tokens_per_block
    if end <= start:
        return
    blocks = cache.blocks
    idx = start // tokens_per_block
    last = end // tokens_per_block
    parent = cache.last_key
    keys = cache.keys
    if keys is not None and idx < len(keys):
        # Blocks of the looked-up context: their keys were hashed at lookup. Each is published
        # unless another block holds its key (then it stays private). Blocks past ``committed``
        # were never published (their key is None), so it need not be read.
        stop = min(last, len(keys))
        index = store.index
        run = keys[idx:stop]
        if not store.events_on and index.keys().isdisjoint(run):
            # The usual case (nobody published these keys meanwhile): the index takes the run in
            # C-level passes, and each block its key. With events, block by block (one each).
            mine = blocks[idx:stop]
            index.update(zip(run, mine))
            for block, key in zip(mine, run):
                block.key = key
            parent = run[-1]
        else:
            claim = index.setdefault
            events = store.events_on
            for b in range(idx, stop):
                key = keys[b]
                block = blocks[b]
                if claim(key, block) is block:
                    block.key = key
                    if events:
                        store._event("stored", key, block.tier, parent if b else None)
                parent = key
        idx = stop
    if idx < last:
        pack = _block_struct(tokens_per_block).pack
        tokens = req.token_slice(idx * tokens_per_block, end)
        memo = MEMO
        recent = memo.recent  # a later lookup of this block (the next turn's prompt) is a dict probe
        for i in range(0, len(tokens), tokens_per_block):
            data = parent + pack(*tokens[i : i + tokens_per_block])
            key = recent[data] = sha256(data).digest()
            block = blocks[idx]
            if block.key is None:
                store.publish(block, key, parent if idx else None)
            parent = key
            idx += 1
        memo.trim()
    cache.last_key = parent
    cache.committed = end


@functools.cache
def _block_struct(tokens_per_block: int) -> struct.Struct:
    return struct.Struct(f"<{tokens_per_block}i")
