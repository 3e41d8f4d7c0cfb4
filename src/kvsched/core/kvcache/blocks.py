"""Physical KV blocks and the per-tier pool: an O(1) free list plus priority-bucketed LRU lists.

Ownership is explicit: ``locks`` counts active requests using the block (it is then pinned on the
device tier), ``holds`` counts suspended requests keeping it. A block referenced by nobody either
carries a reuse key and waits in its tier's LRU ("cached"), or its slot goes straight back to the
free list.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Block:
    """One block of KV data at one tier; ``slot`` indexes that tier's storage. Moves keep the object."""

    tier: int
    slot: int
    locks: int = 0
    holds: int = 0
    key: bytes | None = None
    # Retention priority used when the block becomes cached (higher survives longer).
    priority: int = 0
    # LRU bucket the block sits in while cached, else None.
    bucket: int | None = None


class TierPool:
    """Slots of one tier: free slots (a stack) and cached blocks (LRU lists keyed by priority)."""

    __slots__ = ("tier", "size", "free", "buckets", "num_cached")

    def __init__(self, tier: int, size: int) -> None:
        self.tier = tier
        self.size = size
        # Popped from the end, so low slot ids are handed out first.
        self.free: list[int] = list(range(size - 1, -1, -1))
        self.buckets: dict[int, OrderedDict[Block, None]] = {}
        self.num_cached = 0

    @property
    def available(self) -> int:
        """Slots obtainable now: free plus evictable cached ones."""
        return len(self.free) + self.num_cached

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` free slots; the caller has checked that there are enough."""
        free = self.free
        out = free[len(free) - n :]
        del free[len(free) - n :]
        out.reverse()
        return out

    def push_cached(self, block: Block) -> None:
        """Make ``block`` the most recently used cached block of its priority."""
        bucket = self.buckets.get(block.priority)
        if bucket is None:
            bucket = self.buckets[block.priority] = OrderedDict()
        bucket[block] = None
        block.bucket = block.priority
        self.num_cached += 1

    def push_many(self, blocks: list[Block]) -> None:
        """``push_cached`` for a batch (in order); one bucket lookup per run of equal priorities."""
        buckets = self.buckets
        prio: int | None = None
        bucket: OrderedDict[Block, None] | None = None
        for block in blocks:
            p = block.priority
            if p != prio:
                prio = p
                bucket = buckets.get(p)
                if bucket is None:
                    bucket = buckets[p] = OrderedDict()
            bucket[block] = None  # type: ignore[index]
            block.bucket = p
        self.num_cached += len(blocks)

    def remove_cached(self, block: Block) -> None:
        """Take ``block`` out of the LRU (it is being reused or moved)."""
        bucket = self.buckets[block.bucket]  # type: ignore[index]
        del bucket[block]
        if not bucket:
            del self.buckets[block.bucket]  # type: ignore[arg-type]
        block.bucket = None
        self.num_cached -= 1

    def pop_victims(self, n: int) -> list[Block]:
        """Remove and return ``n`` cached blocks: lowest priority first, oldest first within it."""
        out: list[Block] = []
        buckets = self.buckets
        left = n
        while left:
            prio = min(buckets)
            bucket = buckets[prio]
            take = min(left, len(bucket))
            popitem = bucket.popitem
            got = [popitem(False)[0] for _ in range(take)]
            for block in got:
                block.bucket = None
            out += got
            left -= take
            if not bucket:
                del buckets[prio]
        self.num_cached -= n
        return out

    def cached_blocks(self) -> list[Block]:
        """Every cached block (for checks and stats; not a hot path)."""
        return [p for bucket in self.buckets.values() for p in bucket]
