"""Physical KV blocks and the per-tier pool: an O(1) free list plus priority-bucketed LRU queues.

Ownership is explicit: ``locks`` counts active requests using the block (it is then pinned on the
device tier), ``holds`` counts suspended requests keeping it. A block referenced by nobody either
carries a reuse key and waits in its tier's LRU ("cached"), or its slot goes straight back to the
free list.

The LRU of one priority is a FIFO queue with lazy deletion (the scheme of a timer wheel's cancelled
entries): taking a cached block back for reuse only clears its ``stamp``, and its stale entry is
skipped when eviction reaches it. Every entry carries the stamp the block had when it was queued, so a
block released again (a fresh entry at the tail) is evicted at its new place, as an ordered dict's
delete-and-reinsert would. A queue is two plain lists read from a head index: appends are cheap,
eviction takes a whole run of entries with one slice and checks it with one list comparison, and
memory is touched in order, which matters when millions of blocks pass through a pool (the
simulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

# Stale entries allowed beyond the live ones before a pool's queues are rebuilt (amortised O(1)).
_COMPACT_SLACK = 1024
# Consumed entries allowed at a queue's front before its lists are cut (amortised O(1)).
_CUT_SLACK = 4096


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
    # Stamp of the block's LRU entry while it is cached, else -1; an entry with another stamp is
    # stale. One field is both the "cached" flag and the entry check, so eviction validates a run
    # of entries by comparing two lists (one C-level pass) instead of reading two fields per block.
    stamp: int = -1

    @property
    def cached(self) -> bool:
        """Waiting in its tier's LRU (nobody references it)."""
        return self.stamp >= 0


_stamp_of = attrgetter("stamp")


class LruQueue:
    """Cached blocks of one priority, oldest first, with the stamp each was queued with.

    Two lists read from ``head``: eviction takes a run of entries with one slice each (C-level),
    and consumed entries are cut off once they are more than half of the lists (amortised O(1)).
    """

    __slots__ = ("blocks", "stamps", "head")

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.stamps: list[int] = []
        self.head = 0

    def live(self) -> list[Block]:
        """The blocks whose entry is current, oldest first (O(entries): checks and compaction)."""
        h = self.head
        return [p for p, s in zip(self.blocks[h:], self.stamps[h:]) if p.stamp == s]

    def consume(self, end: int) -> None:
        """Entries before ``end`` are gone; cut them off the lists when they are most of them."""
        if 2 * end > len(self.blocks) + _CUT_SLACK:
            del self.blocks[:end]
            del self.stamps[:end]
            end = 0
        self.head = end


class TierPool:
    """Slots of one tier: free slots (a stack) and cached blocks (LRU queues keyed by priority).

    ``num_cached`` counts live entries, ``entries`` all queued ones (live + stale). Stamps step by 2
    from the tier's id + 2, so the two pools of a store never hand out the same stamp and a stamp
    is never negative.
    """

    __slots__ = ("tier", "size", "free", "buckets", "num_cached", "entries", "stamp")

    def __init__(self, tier: int, size: int) -> None:
        self.tier = tier
        self.size = size
        # Popped from the end, so low slot ids are handed out first.
        self.free: list[int] = list(range(size - 1, -1, -1))
        self.buckets: dict[int, LruQueue] = {}
        self.num_cached = 0
        self.entries = 0
        self.stamp = tier

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

    def push_many(self, blocks: list[Block]) -> None:
        """Make ``blocks`` (in order) the most recently used cached blocks of their priorities; one
        bucket lookup per run of equal priorities."""
        self.push_moved(blocks, None)

    def push_moved(self, blocks: list[Block], slots: list[int] | None) -> None:
        """``push_many`` for blocks that arrive in this tier at ``slots`` (an offload's victims),
        which are set in the same pass; None: they are already here."""
        buckets = self.buckets
        stamp = self.stamp
        tier = self.tier
        prio: int | None = None
        add_block = add_stamp = None
        for i, block in enumerate(blocks):
            p = block.priority
            if p != prio:
                prio = p
                queue = buckets.get(p)
                if queue is None:
                    queue = buckets[p] = LruQueue()
                add_block, add_stamp = queue.blocks.append, queue.stamps.append
            if slots is not None:
                block.tier = tier
                block.slot = slots[i]
            stamp += 2
            block.stamp = stamp
            add_block(block)  # type: ignore[misc]
            add_stamp(stamp)  # type: ignore[misc]
        self.stamp = stamp
        self._queued(len(blocks))

    def push_run(self, blocks: list[Block], priority: int) -> None:
        """``push_many`` for blocks that all take ``priority`` (a request's released blocks): set
        here, and queued with one ``extend`` per list."""
        queue = self.buckets.get(priority)
        if queue is None:
            queue = self.buckets[priority] = LruQueue()
        n = len(blocks)
        first = self.stamp + 2
        # One int object per stamp, shared by the block and its entry (one allocation, one memory
        # line read when the entry is checked).
        stamps = list(range(first, first + 2 * n, 2))
        for block, stamp in zip(blocks, stamps):
            block.priority = priority
            block.stamp = stamp
        queue.blocks += blocks
        queue.stamps += stamps
        self.stamp = first + 2 * (n - 1)
        self._queued(n)

    def _queued(self, n: int) -> None:
        """Count ``n`` new live entries; compact once stale ones outnumber the live by the slack."""
        self.num_cached += n
        self.entries += n
        if self.entries > 2 * self.num_cached + _COMPACT_SLACK:
            self.compact()

    def remove_cached(self, block: Block) -> None:
        """Take ``block`` out of the LRU (it is being reused or moved); its entry goes stale."""
        block.stamp = -1
        self.num_cached -= 1

    def pop_victims(self, n: int) -> list[Block]:
        """Remove and return ``n`` cached blocks (``n <= num_cached``): lowest priority first,
        oldest first within it; stale entries met on the way are dropped.

        The victims keep their stamp: the caller re-queues them (``push_moved``, ``push_many``) or
        drops them (``BlockStore._drop_many`` clears it), which writes the field once, not twice."""
        out: list[Block] = []
        buckets = self.buckets
        left = n
        while left:
            prio = min(buckets)
            queue = buckets[prio]
            blocks, stamps = queue.blocks, queue.stamps
            head = end = queue.head
            size = len(blocks)
            stop = min(head + left, size)
            run = blocks[head:stop]
            if list(map(_stamp_of, run)) == stamps[head:stop]:  # no stale entry: the usual case
                out += run
                left -= stop - head
                end = stop
            else:
                while left and end < size:  # entry by entry, skipping the stale ones
                    p = blocks[end]
                    if p.stamp == stamps[end]:
                        out.append(p)
                        left -= 1
                    end += 1
            self.entries -= end - head
            if end == size:
                del buckets[prio]
            else:
                queue.consume(end)
        self.num_cached -= n
        if not self.num_cached:  # only stale entries can be left: forget them
            buckets.clear()
            self.entries = 0
        return out

    def compact(self) -> None:
        """Drop every stale entry (kept order); O(entries), run when they outnumber live ones."""
        buckets = self.buckets
        for prio in list(buckets):
            queue = buckets[prio]
            live = queue.live()
            if live:
                queue.blocks = live
                queue.stamps = [p.stamp for p in live]
                queue.head = 0
            else:
                del buckets[prio]
        self.entries = self.num_cached

    def cached_blocks(self) -> list[Block]:
        """Every cached block (for checks and stats; not a hot path)."""
        return [p for queue in self.buckets.values() for p in queue.live()]
