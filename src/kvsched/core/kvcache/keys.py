"""Reuse keys: a chained SHA-256 over whole blocks of tokens.

A block's key is SHA-256(parent key || tokens as 4-byte little-endian ints); the root key encodes the
reuse scope (LoRA id, salt). The hash is cryptographic because a match is trusted on the digest alone.
The encoding is part of the contract with routers (KV events): never change it.
"""

from __future__ import annotations

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


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Tokens as contiguous 4-byte little-endian ints (one call for a whole prompt; struct is
    faster than array('i') here and fixes the byte order on any machine)."""
    return struct.pack(f"<{len(tokens)}i", *tokens)


def chain_keys(parent: bytes, packed: bytes, block_bytes: int) -> list[bytes]:
    """Keys of every whole block in ``packed`` (a trailing partial block is ignored)."""
    # One hash call per block, in a comprehension (no per-block method lookups or appends).
    return [
        parent := sha256(parent + packed[start : start + block_bytes]).digest()
        for start in range(0, len(packed) - block_bytes + 1, block_bytes)
    ]


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of one block given its parent key."""
    h = sha256(parent)
    h.update(pack_tokens(tokens))
    return h.digest()
