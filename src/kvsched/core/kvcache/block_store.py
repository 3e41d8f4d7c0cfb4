"""The tiered block store: pools per tier, the reuse index, eviction, migration, events and counters.

Everything that moves or frees a block goes through here, so the accounting (free + used + cached ==
total per tier) has one owner. Making room on the device evicts cached blocks least-recently-used
(lowest retention priority first); an evicted block moves to the host tier when the host has room
(one batched copy) and stays reusable there, otherwise it is dropped.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from kvsched.core.errors import KVTransferError
from kvsched.core.kvcache.blocks import Block, TierPool
from kvsched.core.kvcache.storage import COPY_ERRORS, KVStorage
from kvsched.core.kvcache.types import DEVICE, HOST, KVCacheStats, KVEvent, Tier

MAX_EVENTS = 65536
_TIERS = (Tier.DEVICE, Tier.HOST)
_slot_of = attrgetter("slot")


class BlockStore:
    """Pools of both tiers, the key -> block index of reusable blocks, and the copy path."""

    __slots__ = (
        "device",
        "host",
        "index",
        "storage",
        "counters",
        "events",
        "events_on",
        "num_locked",
        "parked",
        "spare",
    )

    def __init__(
        self, num_device_blocks: int, num_host_blocks: int, storage: KVStorage, events: bool
    ) -> None:
        self.device = TierPool(DEVICE, num_device_blocks)
        self.host = TierPool(HOST, num_host_blocks)
        # Every published block by key; a key lives on exactly one tier at a time.
        self.index: dict[bytes, Block] = {}
        self.storage = storage
        self.counters = KVCacheStats(num_device_blocks=num_device_blocks, num_host_blocks=num_host_blocks)
        self.events: deque[KVEvent] = deque(maxlen=MAX_EVENTS)
        # Off: no KVEvent is built at all (a simulation has no router; ~4 objects per evicted block).
        self.events_on = events
        # Device blocks with at least one lock (used by active requests).
        self.num_locked = 0
        # Device blocks held only by suspended requests (the host had no room when they were parked):
        # moved to the host when the device needs room and the host has some. Oldest first.
        self.parked: dict[Block, None] = {}
        # Block objects nobody references any more (freed or dropped), reused by new_device_blocks:
        # re-initialising four fields is ~6x cheaper than building a Block. At most a pool's worth.
        self.spare: list[Block] = []

    def pool(self, tier: int) -> TierPool:
        return self.device if tier == DEVICE else self.host

    # -- references ----------------------------------------------------------------------------
    def release_many(self, blocks: list[Block], locked: bool, priority: int) -> None:
        """``release`` each block, last block first (so a request's tail is evicted before its head).

        Blocks nobody references any more are collected per tier and pushed to the LRU (or the free
        list) in one call each: a finishing long request releases hundreds of blocks at once.
        """
        released = 0
        parked = self.parked
        cached: tuple[list[Block], list[Block]] = ([], [])
        freed: tuple[list[Block], list[Block]] = ([], [])
        for p in reversed(blocks):
            if locked:
                n = p.locks - 1
                p.locks = n
                if n:
                    continue
                released += 1
                if p.holds:
                    parked[p] = None  # still held by a suspended request
                    continue
            else:
                n = p.holds - 1
                p.holds = n
                if n or p.locks:
                    continue
                if parked and p in parked:
                    del parked[p]
            if p.key is not None:
                cached[p.tier].append(p)
            else:
                freed[p.tier].append(p)
        self.num_locked -= released
        for pool, more, gone in ((self.device, cached[0], freed[0]), (self.host, cached[1], freed[1])):
            if more:
                pool.push_run(more, priority)
            if gone:
                pool.free.extend([p.slot for p in gone])
                self._recycle(gone)

    def _recycle(self, blocks: list[Block]) -> None:
        """Keep unreferenced Block objects (no locks, holds or key; not cached) for reuse."""
        if len(self.spare) < self.device.size:
            self.spare.extend(blocks)

    def new_device_blocks(self, n: int) -> tuple[list[Block], list[int]]:
        """``n`` fresh locked device blocks and their slots (the request's block table grows by
        them); the caller has reserved the room."""
        self.num_locked += n
        self.counters.allocated_blocks += n
        slots = self.device.alloc(n)
        spare = self.spare
        k = max(len(spare) - n, 0)
        blocks = spare[k:]
        del spare[k:]
        for p, slot in zip(blocks, slots):
            p.tier = DEVICE
            p.slot = slot
            p.locks = 1  # priority is set when the block is released into the LRU
        if len(blocks) < n:  # too few spares: build the rest
            blocks += [Block(DEVICE, slot, 1) for slot in slots[len(blocks) :]]
        return blocks, slots

    # -- publishing ----------------------------------------------------------------------------
    def publish(self, block: Block, key: bytes, parent: bytes | None) -> None:
        """Make ``block`` reusable under ``key``, unless another block already holds that key (then
        ``block`` stays private: two requests computed the same block at the same time)."""
        if key in self.index:
            return
        block.key = key
        self.index[key] = block
        if self.events_on:
            self._event("stored", key, block.tier, parent)

    def _event(self, kind: str, key: bytes, tier: int, parent: bytes | None = None) -> None:
        self.events.append(KVEvent(kind, key, _TIERS[tier], parent))
        self.counters.num_events += 1

    # -- making room ---------------------------------------------------------------------------
    def reserve(self, tier: int, n: int) -> bool:
        """Ensure ``n`` free slots on ``tier``; all or nothing (False before anything moves).

        Evicts cached blocks LRU (device victims go to the host when it has room, else are dropped);
        on the device, parked blocks of suspended requests are moved to the host first if needed.
        """
        pool = self.pool(tier)
        deficit = n - len(pool.free)
        if deficit <= 0:
            return True
        if tier == DEVICE:
            extra = deficit - pool.num_cached
            if extra > 0:
                if extra > len(self.parked) or extra > self.host.available:
                    return False
                it = iter(self.parked)
                try:
                    self.migrate([next(it) for _ in range(extra)], HOST)
                except KVTransferError:
                    return False  # the parked blocks stay where they are: no room made
                deficit -= extra
        elif deficit > pool.num_cached:
            return False
        if deficit <= 0:
            return True
        victims = pool.pop_victims(deficit)  # oldest first
        if tier == DEVICE:
            keep = min(self.host.available, deficit)
            drop = deficit - keep
            if drop:
                self._drop_many(victims[:drop], DEVICE)
            if keep:
                self._offload(victims[drop:] if drop else victims)
        else:
            self._drop_many(victims, tier)
        return True

    def drop_all_cached(self) -> int:
        n = 0
        for pool in (self.device, self.host):
            victims = pool.pop_victims(pool.num_cached)
            self._drop_many(victims, pool.tier)
            n += len(victims)
        return n

    def _drop_many(self, blocks: list[Block], tier: int) -> None:
        """Forget cached blocks of ``tier`` (``TierPool.pop_victims``' victims): their keys leave the
        index and their slots are freed. A cached block always owns its key's index entry."""
        index = self.index
        if self.events_on:
            for block in blocks:
                self._event("removed", block.key, tier)  # type: ignore[arg-type]
        for block in blocks:
            del index[block.key]  # type: ignore[arg-type]  # a cached block carries its key
            block.key = None
            block.stamp = -1  # no longer cached (``pop_victims`` leaves it to the caller)
        self.pool(tier).free += map(_slot_of, blocks)
        self._recycle(blocks)
        if tier == DEVICE:
            self.counters.dropped_device_blocks += len(blocks)
        else:
            self.counters.dropped_host_blocks += len(blocks)

    def _offload(self, blocks: list[Block]) -> None:
        """Cached device blocks (none held, none parked) to the host LRU with one batched copy.

        A copy that fails at run time (``COPY_ERRORS``) drops the blocks instead: only cached copies
        were moving, and the room is made all the same. Anything else (a bad slot, a length
        mismatch) is a bug and propagates, with the host slots returned and the blocks cached on the
        device again: nothing is lost or owned twice."""
        n = len(blocks)
        host = self.host
        if not self.reserve(HOST, n):
            raise RuntimeError(f"offload: {n} blocks do not fit the host tier")  # caller bug
        dst_slots = host.alloc(n)
        src_slots = list(map(_slot_of, blocks))
        try:
            self.storage.copy_blocks(Tier.DEVICE, src_slots, Tier.HOST, dst_slots)
        except Exception as exc:
            host.free += dst_slots
            if isinstance(exc, COPY_ERRORS):
                self._drop_many(blocks, DEVICE)
                return
            self.device.push_many(blocks)  # a bug: nothing moved, the victims are cached again
            raise
        self.device.free += src_slots
        host.push_moved(blocks, dst_slots)
        if self.events_on:
            for block in blocks:
                self._event("removed", block.key, DEVICE)  # type: ignore[arg-type]
                self._event("stored", block.key, HOST)  # type: ignore[arg-type]
        c = self.counters
        c.offload_blocks += n
        c.offload_bytes += n * self.storage.bytes_per_block

    def migrate(self, blocks: list[Block], dst: int) -> None:
        """Move blocks (all on the other tier, none cached) to ``dst`` with one batched copy.

        A copy that fails at run time (``COPY_ERRORS``) raises ``KVTransferError`` and moves
        nothing; any other exception from the copy is a bug and propagates as itself, the
        destination slots returned all the same (the rule of ``_offload``).

        The caller has made sure ``dst`` can take them (``reserve``); this call reserves again,
        which is then a no-op or evicts what the caller counted as evictable.
        """
        n = len(blocks)
        src = HOST if dst == DEVICE else DEVICE
        if not self.reserve(dst, n):
            raise RuntimeError(f"migrate: {n} blocks do not fit tier {Tier(dst).name}")  # caller bug
        dst_pool = self.pool(dst)
        src_pool = self.pool(src)
        dst_slots = dst_pool.alloc(n)
        src_slots = [p.slot for p in blocks]
        try:
            self.storage.copy_blocks(_TIERS[src], src_slots, _TIERS[dst], dst_slots)
        except Exception as exc:
            dst_pool.free.extend(dst_slots)  # nothing moved: the blocks keep their source slots
            if not isinstance(exc, COPY_ERRORS):
                raise  # a caller bug (bad slot, length mismatch), not a failed copy: as itself
            raise KVTransferError(
                f"copying {n} KV blocks {Tier(src).name} -> {Tier(dst).name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        src_pool.free.extend(src_slots)
        parked = self.parked
        if parked:
            for block in blocks:
                if block in parked:
                    del parked[block]
        for block, slot in zip(blocks, dst_slots):
            block.tier = dst
            block.slot = slot
        if self.events_on:
            for block in blocks:
                if block.key is not None:
                    self._event("removed", block.key, src)
                    self._event("stored", block.key, dst)
        nbytes = n * self.storage.bytes_per_block
        c = self.counters
        if dst == HOST:
            c.offload_blocks += n
            c.offload_bytes += nbytes
        else:
            c.onboard_blocks += n
            c.onboard_bytes += nbytes
