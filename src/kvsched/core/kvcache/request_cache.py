"""Per-request KV state, kept in one small slots object so the decode hot path touches few attributes."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvsched.core.kvcache.blocks import Block
from kvsched.core.request import Request


@dataclass(slots=True, eq=False)
class RequestCache:
    """Lengths in tokens, always ``committed <= history <= capacity <= len(blocks) * tokens_per_block``.

    ``table`` mirrors the device slots of ``blocks`` while the cache is active (locked blocks never
    move). ``pending`` marks a cache whose prefix lookup is still to be done (new, or discarded
    after its first chunk failed to get blocks). ``keys`` are the chain keys of the context's
    looked-up blocks, hashed once (a waiting context looks up again each step; commit reuses them).
    ``counted`` is what this cache added to the reuse hit/miss counters (undone on discard, so an
    admitted context counts once).
    """

    request_id: int
    req: Request
    root: bytes
    priority: int
    blocks: list[Block] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    capacity: int = 0
    history: int = 0
    committed: int = 0
    num_reused: int = 0
    # Tokens the allocated blocks can hold (len(blocks) * tokens_per_block).
    alloc_tokens: int = 0
    last_key: bytes = b""
    active: bool = False
    pending: bool = True
    was_suspended: bool = False
    keys: list[bytes] | None = None
    counted: tuple[int, int, int, int] | None = None
