"""The tiered block store: pools per tier, the reuse index, eviction, migration, events and counters.

Everything that moves or frees a page goes through here, so the accounting (free + used + cached ==
total per tier) has one owner. Making room on the device evicts cached pages least-recently-used
(lowest retention priority first); an evicted page moves to the host tier when the host has room
(one batched copy) and stays reusable there, otherwise it is dropped.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from kvsched.core.kvcache.pages import Page, TierPool
from kvsched.core.kvcache.storage import KVStorage
from kvsched.core.kvcache.types import DEVICE, HOST, KVCacheStats, KVEvent, Tier

MAX_EVENTS = 65536
_TIERS = (Tier.DEVICE, Tier.HOST)


class BlockStore:
    """Pools of both tiers, the key -> page index of reusable blocks, and the copy path."""

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
        # Every published page by key; a key lives on exactly one tier at a time.
        self.index: dict[bytes, Page] = {}
        self.storage = storage
        self.counters = KVCacheStats(num_device_blocks=num_device_blocks, num_host_blocks=num_host_blocks)
        self.events: deque[KVEvent] = deque(maxlen=MAX_EVENTS)
        # Off: no KVEvent is built at all (a simulation has no router; ~4 objects per evicted block).
        self.events_on = events
        # Device pages with at least one lock (used by active requests).
        self.num_locked = 0
        # Device pages held only by suspended requests (the host had no room when they were parked):
        # moved to the host when the device needs room and the host has some. Oldest first.
        self.parked: dict[Page, None] = {}
        # Page objects nobody references any more (freed or dropped), reused by new_device_pages:
        # re-initialising four fields is ~6x cheaper than building a Page. At most a pool's worth.
        self.spare: list[Page] = []

    def pool(self, tier: int) -> TierPool:
        return self.device if tier == DEVICE else self.host

    # -- references ----------------------------------------------------------------------------
    def hold_many(self, pages: list[Page]) -> int:
        """``hold`` for a matched prefix (inlined: it runs per block of a long prompt); returns how
        many of the pages are on the host tier."""
        device, host = self.device, self.host
        on_host = 0
        for p in pages:
            if p.tier:
                on_host += 1
            if p.bucket is not None:
                (host if p.tier else device).remove_cached(p)
            p.holds += 1
        return on_host

    def release_many(self, pages: list[Page], locked: bool, priority: int) -> None:
        """``release`` each page, last block first (so a request's tail is evicted before its head).

        Pages nobody references any more are collected per tier and pushed to the LRU (or the free
        list) in one call each: a finishing long request releases hundreds of pages at once.
        """
        released = 0
        parked = self.parked
        cached: tuple[list[Page], list[Page]] = ([], [])
        freed: tuple[list[Page], list[Page]] = ([], [])
        for p in reversed(pages):
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
                p.priority = priority
                cached[p.tier].append(p)
            else:
                freed[p.tier].append(p)
        self.num_locked -= released
        for pool, more, gone in ((self.device, cached[0], freed[0]), (self.host, cached[1], freed[1])):
            if more:
                pool.push_many(more)
            if gone:
                pool.free.extend([p.slot for p in gone])
                self._recycle(gone)

    def _recycle(self, pages: list[Page]) -> None:
        """Keep unreferenced Page objects (no locks, holds, key or LRU bucket) for reuse."""
        if len(self.spare) < self.device.size:
            self.spare.extend(pages)

    def new_device_pages(self, n: int) -> list[Page]:
        """``n`` fresh locked device pages; the caller has reserved the room."""
        self.num_locked += n
        self.counters.allocated_blocks += n
        slots = self.device.alloc(n)
        spare = self.spare
        k = len(spare) - n
        if k < 0:
            return [Page(DEVICE, slot, 1) for slot in slots]
        pages = spare[k:]
        del spare[k:]
        for p, slot in zip(pages, slots):
            p.tier = DEVICE
            p.slot = slot
            p.locks = 1  # priority is set when the page is released into the LRU
        return pages

    # -- publishing ----------------------------------------------------------------------------
    def publish(self, page: Page, key: bytes, parent: bytes | None) -> None:
        """Make ``page`` reusable under ``key``, unless another page already holds that key (then
        ``page`` stays private: two requests computed the same block at the same time)."""
        if key in self.index:
            return
        page.key = key
        self.index[key] = page
        if self.events_on:
            self._event("stored", key, page.tier, parent)

    def _event(self, kind: str, key: bytes, tier: int, parent: bytes | None = None) -> None:
        self.events.append(KVEvent(kind, key, _TIERS[tier], parent))
        self.counters.num_events += 1

    # -- making room ---------------------------------------------------------------------------
    def reserve(self, tier: int, n: int) -> bool:
        """Ensure ``n`` free slots on ``tier``; all or nothing (False before anything moves).

        Evicts cached pages LRU (device victims go to the host when it has room, else are dropped);
        on the device, parked pages of suspended requests are moved to the host first if needed.
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
                self.migrate([next(it) for _ in range(extra)], HOST)
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

    def _drop_many(self, pages: list[Page], tier: int) -> None:
        """Forget cached pages of ``tier``: their keys leave the index and their slots are freed."""
        index = self.index
        events = self.events_on
        slots = []
        for page in pages:
            key = page.key
            if key is not None:
                if index.get(key) is page:
                    del index[key]
                    if events:
                        self._event("removed", key, tier)
                page.key = None
            slots.append(page.slot)
        self.pool(tier).free.extend(slots)
        self._recycle(pages)
        if tier == DEVICE:
            self.counters.dropped_device_blocks += len(pages)
        else:
            self.counters.dropped_host_blocks += len(pages)

    def _offload(self, pages: list[Page]) -> None:
        """Cached device pages (none held, none parked) to the host LRU: ``migrate`` + ``push_many``
        in one pass over the pages (this runs for every block a long prompt evicts)."""
        n = len(pages)
        host = self.host
        if not self.reserve(HOST, n):
            raise RuntimeError(f"offload: {n} pages do not fit the host tier")  # caller bug
        dst_slots = host.alloc(n)
        src_slots = [p.slot for p in pages]
        self.storage.copy_blocks(Tier.DEVICE, src_slots, Tier.HOST, dst_slots)
        self.device.free.extend(src_slots)
        buckets = host.buckets
        prio: int | None = None
        bucket: OrderedDict[Page, None] | None = None
        for page, slot in zip(pages, dst_slots):
            page.tier = HOST
            page.slot = slot
            p = page.priority
            if p != prio:
                prio = p
                bucket = buckets.get(p)
                if bucket is None:
                    bucket = buckets[p] = OrderedDict()
            bucket[page] = None  # type: ignore[index]
            page.bucket = p
        host.num_cached += n
        if self.events_on:
            for page in pages:
                self._event("removed", page.key, DEVICE)  # type: ignore[arg-type]
                self._event("stored", page.key, HOST)  # type: ignore[arg-type]
        c = self.counters
        c.offload_blocks += n
        c.offload_bytes += n * self.storage.bytes_per_block

    def migrate(self, pages: list[Page], dst: int) -> None:
        """Move pages (all on the other tier, none cached) to ``dst`` with one batched copy.

        The caller has made sure ``dst`` can take them (``reserve``); this call reserves again,
        which is then a no-op or evicts what the caller counted as evictable.
        """
        n = len(pages)
        src = HOST if dst == DEVICE else DEVICE
        if not self.reserve(dst, n):
            raise RuntimeError(f"migrate: {n} pages do not fit tier {Tier(dst).name}")  # caller bug
        dst_pool = self.pool(dst)
        src_pool = self.pool(src)
        dst_slots = dst_pool.alloc(n)
        src_slots = [p.slot for p in pages]
        self.storage.copy_blocks(_TIERS[src], src_slots, _TIERS[dst], dst_slots)
        src_pool.free.extend(src_slots)
        parked = self.parked
        if parked:
            for page in pages:
                if page in parked:
                    del parked[page]
        for page, slot in zip(pages, dst_slots):
            page.tier = dst
            page.slot = slot
        if self.events_on:
            for page in pages:
                if page.key is not None:
                    self._event("removed", page.key, src)
                    self._event("stored", page.key, dst)
        nbytes = n * self.storage.bytes_per_block
        c = self.counters
        if dst == HOST:
            c.offload_blocks += n
            c.offload_bytes += nbytes
        else:
            c.onboard_blocks += n
            c.onboard_bytes += nbytes
