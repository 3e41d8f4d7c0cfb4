"""Reuse keys: a chained SHA-256 over whole blocks of tokens.

A block's key is SHA-256(parent key || tokens as 4-byte little-endian ints); the root key encodes the
reuse scope (LoRA id, salt). The hash is cryptographic because a match is trusted on the digest alone.
The encoding is part of the contract with routers (KV events): never change it.

Hashing is most of a prefix lookup's cost (about 0.3 us per block in hashlib), and a lookup that
hits re-hashes blocks that were hashed before. ``KeyMemo`` remembers recent ``(parent || tokens) ->
keys`` pairs, so a repeated prefix is found by content with dict probes, the way a radix tree
(SGLang's RadixAttention) walks edges by token content: one probe per aligned group of ``GROUP``
blocks of a looked-up prompt, one per block for a prompt's trailing blocks and for blocks published
as they are generated. A memo entry is a pure function's value: it is never stale, only bounded.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from hashlib import sha256

_U64 = (1 << 64) - 1


def root_key(lora_id: int | None, salt: int | None) -> bytes:
    """Key of the empty prefix in a reuse scope: one mask byte, then each present field as u64 LE."""
    mask = (lora_id is not None) | ((salt is not None) << 1)
    body = bytearray([mask])
    for value in (lora_id, salt):
        if value is not None:
            body += struct.pack("<Q", value & _U64)
    return sha256(body).digest()


#: ``root_key`` of recent (adapter, salt) scopes, shared by the manager and the router's index:
#: bounded, since every tenant salt is a scope of its own.
cached_root_key = functools.lru_cache(maxsize=4096)(root_key)


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Tokens as contiguous 4-byte little-endian ints (one call for a whole prompt; fixes the byte
    order on any machine). A ``Struct`` object packs twice as fast as ``struct.pack(fmt, ...)``
    and is built in O(1) (the count is one repeat, not one code per token)."""
    return struct.Struct(f"<{len(tokens)}i").pack(*tokens)


#: Blocks per memo group: a looked-up prompt's whole, aligned runs of this many blocks are remembered
#: as one entry (one probe and one insert per run instead of one per block).
GROUP = 16


def chain_keys(parent: bytes, packed: bytes, block_bytes: int) -> list[bytes]:
    """Keys of every whole block in ``packed`` (a trailing partial block is ignored).

    The keys the memo remembers first (``known_keys``); after the first block it does not know, the
    rest of the chain is new as well (its parent key is): hashed, then remembered as groups, the
    tail block by block.
    """
    memo = MEMO
    n = len(packed) // block_bytes
    full = n // GROUP
    keys, g = known_keys(parent, packed, block_bytes)
    known = len(keys)
    if known < n:
        last = keys[-1] if keys else parent
        append = keys.append
        for chunk in split_blocks(packed[known * block_bytes :] if known else packed, block_bytes):
            last = sha256(last + chunk).digest()
            append(last)
    if g < full or known < n:
        _remember(memo, parent, packed, keys, block_bytes, g, known)
    memo.trim()
    return keys


def known_keys(parent: bytes, packed: bytes, block_bytes: int) -> tuple[list[bytes], int]:
    """Keys of the leading whole blocks of ``packed`` that the memo remembers, up to the first one it
    does not know, and how many whole groups of ``GROUP`` blocks were found as one entry each:
    remembered groups first (a probe each), then remembered single blocks (generated blocks, an
    earlier prompt's tail). Entries found in the older generation move to the recent one."""
    memo = MEMO
    groups, older_groups = memo.groups, memo.older_groups
    n = len(packed) // block_bytes
    span = GROUP * block_bytes
    full = n // GROUP
    keys: list[bytes] = []
    g = 0
    while g < full:
        data = parent + packed[g * span : (g + 1) * span]
        run = groups.get(data)
        if run is None:
            run = older_groups.get(data)
            if run is None:
                break
            groups[data] = run  # still in use: survives the next rotation
        keys += run
        parent = run[-1]
        g += 1
    recent, older = memo.recent, memo.older
    append = keys.append
    # Sliced as probed, so a cold rest is not split here as well as in chain_keys.
    for offset in range(g * span, n * block_bytes, block_bytes):
        data = parent + packed[offset : offset + block_bytes]
        key = recent.get(data)
        if key is None:
            key = older.get(data)
            if key is None:
                break
            recent[data] = key
        append(key)
        parent = key
    return keys, g


def _remember(
    memo: KeyMemo, root: bytes, packed: bytes, keys: list[bytes], block_bytes: int, g: int, new: int
) -> None:
    """Remember a chain's whole groups from group ``g`` on, and its hashed blocks (from block
    ``new``) past its last whole group one by one."""
    groups, recent = memo.groups, memo.recent
    span = GROUP * block_bytes
    n = len(keys)
    full = n // GROUP
    for gi in range(g, full):
        b = gi * GROUP
        groups[(keys[b - 1] if b else root) + packed[gi * span : gi * span + span]] = tuple(
            keys[b : b + GROUP]
        )
    for j in range(max(full * GROUP, new), n):
        recent[(keys[j - 1] if j else root) + packed[j * block_bytes : (j + 1) * block_bytes]] = keys[j]


def hash_chain(parent: bytes, packed: bytes, block_bytes: int) -> list[bytes]:
    """``chain_keys`` without the memo: every block hashed, nothing remembered (for a caller that
    caches whole runs of keys itself, as the simulator's per-segment keys)."""
    keys: list[bytes] = []
    append = keys.append
    for chunk in split_blocks(packed, block_bytes):
        parent = sha256(parent + chunk).digest()
        append(parent)
    return keys


class KeyMemo:
    """Recently hashed ``parent || packed tokens -> key`` pairs, two generations of ``size``.

    Lookups read both; new and re-used entries go to the recent generation (``recent``, and
    ``groups`` for whole runs of ``GROUP`` blocks); when it remembers more than ``size``
    blocks it becomes ``older`` and the previous ``older`` is dropped (an approximate LRU at one
    dict swap per ``size`` blocks). At most ``2 * size`` blocks plus one call's: with 16-token
    blocks and ``size = 65536`` about 2M tokens of prefixes, ~30 MB. Safe to share between threads
    (the values never change; a swap at worst forgets entries).
    """

    __slots__ = ("size", "recent", "older", "groups", "older_groups")

    def __init__(self, size: int) -> None:
        self.size = size
        self.recent: dict[bytes, bytes] = {}
        self.older: dict[bytes, bytes] = {}
        # ``parent || GROUP blocks of tokens -> their GROUP keys``: the length of the data fixes the
        # block size, so groups of different block sizes never meet (a block's key does not depend
        # on the block size: single blocks share one dict).
        self.groups: dict[bytes, tuple[bytes, ...]] = {}
        self.older_groups: dict[bytes, tuple[bytes, ...]] = {}

    def rotate(self) -> None:
        self.older = self.recent
        self.recent = {}
        self.older_groups = self.groups
        self.groups = {}

    def trim(self) -> None:
        """Rotate once the recent generation remembers more than ``size`` blocks (called once per
        lookup, not per block)."""
        if len(self.recent) + GROUP * len(self.groups) > self.size:
            self.rotate()

    def clear(self) -> None:
        self.recent = {}
        self.older = {}
        self.groups = {}
        self.older_groups = {}

    def __len__(self) -> int:
        """Remembered blocks, both generations."""
        return len(self.recent) + len(self.older) + GROUP * (len(self.groups) + len(self.older_groups))


MEMO = KeyMemo(1 << 16)


def split_blocks(packed: bytes, block_bytes: int) -> list[bytes]:
    """``packed`` cut into whole blocks of ``block_bytes`` (a trailing partial block is dropped)."""
    n = len(packed) // block_bytes
    full, rest = divmod(n, _GROUP)
    out: list[bytes] = []
    if full:
        unpack = _splitter(_GROUP, block_bytes).unpack_from
        step = _GROUP * block_bytes
        for offset in range(0, full * step, step):
            out += unpack(packed, offset)
    if rest:
        out += _splitter(rest, block_bytes).unpack_from(packed, full * _GROUP * block_bytes)
    return out


# Blocks per unpack call: a "64s" code per block makes a format's size grow with it, so a whole
# prompt's format would cost O(blocks) to build; groups keep the cached formats small.
_GROUP = 64


@functools.lru_cache(maxsize=256)
def _splitter(n: int, block_bytes: int) -> struct.Struct:
    return struct.Struct(f"{block_bytes}s" * n)


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of one block given its parent key."""
    h = sha256(parent)
    h.update(pack_tokens(tokens))
    return h.digest()
