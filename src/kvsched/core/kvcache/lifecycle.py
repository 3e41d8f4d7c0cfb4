"""Request-cache transitions: attach a reused prefix, suspend, resume, discard.

Suspend policy (why it is safe for shared blocks): a request's references turn from locks into
holds. Pages that no active request locks any more are copied to the host tier in one batch (as
many as the host can take; the rest are "parked" on the device and move down later when the device
needs room and the host has some). Pages shared with an active request stay where they are, pinned
by that request (parked once it lets go). A held page is never dropped, only moved, so resume always
finds every page again (on the device, or on the host to copy back) and data comes back byte for
byte. A fresh cache (nothing computed yet, at most a reused prefix) is never copied: it is discarded
instead (the prefix stays cached) and its lookup is redone by the next ``prepare_context``.
"""

from __future__ import annotations

from typing import Any

from kvsched.core.kvcache.block_store import BlockStore
from kvsched.core.kvcache.prefix import match_prefix
from kvsched.core.kvcache.request_cache import RequestCache
from kvsched.core.kvcache.types import DEVICE, HOST


def attach_prefix(store: BlockStore, c: RequestCache, req: Any, tpb: int, reuse: bool) -> None:
    """Look the context minus its last token up; hold the matched pages; set the positions."""
    c.pending = False
    reused = 0
    if reuse:
        nfull = (req.num_context_tokens - 1) // tpb
        pages, last = match_prefix(store.index, c.root, req.token_slice(0, nfull * tpb), tpb)
        counters = store.counters
        on_host = store.hold_many(pages)
        on_device = len(pages) - on_host
        counters.reuse_hit_blocks_device += on_device
        counters.reuse_hit_blocks_host += on_host
        counters.reuse_hit_tokens_device += on_device * tpb
        counters.reuse_hit_tokens_host += on_host * tpb
        reused = len(pages) * tpb
        counters.reuse_miss_blocks += nfull - len(pages)
        counters.reuse_miss_tokens += req.num_context_tokens - reused
        c.pages = pages
        c.last_key = last
    c.capacity = c.history = c.committed = c.num_reused = c.alloc_tokens = reused
    req.context_current_position = reused
    req.num_reused_tokens = reused


def resume_cache(store: BlockStore, c: RequestCache, max_util: float) -> bool:
    """Bring every page of a held cache to the device and lock it; False (no change) if short."""
    device = store.device
    if max_util < 1.0 and (device.size - device.available) / device.size > max_util:
        return False
    pages = c.pages
    onboard = [p for p in pages if p.tier == HOST]
    if onboard:
        # Our own parked pages must not be pushed to the host to make room for the others.
        parked = store.parked
        mine = [p for p in pages if p in parked]
        for p in mine:
            del parked[p]
        if not store.reserve(DEVICE, len(onboard)):
            for p in mine:
                parked[p] = None
            return False
        store.migrate(onboard, DEVICE)
    parked = store.parked
    for p in pages:
        if p.locks == 0:
            store.num_locked += 1
            if p in parked:
                del parked[p]
        p.locks += 1
        p.holds -= 1
    c.table = [p.slot for p in pages]
    c.active = True
    if c.was_suspended:
        c.was_suspended = False
        store.counters.num_resumes += 1
    return True


def suspend_cache(store: BlockStore, c: RequestCache) -> None:
    """Locks become holds; pages no active request uses go to the host (one batched copy)."""
    pages = c.pages
    for p in pages:
        p.locks -= 1
        p.holds += 1
        if p.locks == 0:
            store.num_locked -= 1
    movable = [p for p in pages if p.locks == 0]
    n = min(len(movable), store.host.available)
    if n:
        store.migrate(movable[:n], HOST)
    for p in movable[n:]:
        store.parked[p] = None  # no host room now: moved later if the device needs the room
    c.active = False
    c.was_suspended = True
    c.table = []
    store.counters.num_suspends += 1


def discard_cache(store: BlockStore, c: RequestCache, req: Any) -> None:
    """Let go of a fresh cache (only a reused prefix, nothing computed); redo the lookup later."""
    store.release_many(c.pages, c.active, c.priority)
    c.pages = []
    c.table = []
    c.capacity = c.history = c.committed = c.num_reused = c.alloc_tokens = 0
    c.last_key = c.root
    c.active = False
    c.pending = True
    req.context_current_position = 0
    req.num_reused_tokens = 0
