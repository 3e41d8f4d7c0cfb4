"""Request-cache transitions: attach a reused prefix, suspend, resume, discard.

Suspend policy (why it is safe for shared blocks): a request's references turn from locks into
holds. Blocks that no active request locks any more are copied to the host tier in one batch (as
many as the host can take; the rest are "parked" on the device and move down later when the device
needs room and the host has some). Blocks shared with an active request stay where they are, pinned
by that request (parked once it lets go). A held block is never dropped, only moved, so resume always
finds every block again (on the device, or on the host to copy back) and data comes back byte for
byte. A fresh cache (nothing computed yet, at most a reused prefix) is never copied: it is discarded
instead (the prefix stays cached) and its lookup is redone by the next ``prepare_context``.
"""

from __future__ import annotations

from collections.abc import Callable

from kvsched.core.errors import ConfigError, KVTransferError
from kvsched.core.kvcache.block_store import BlockStore
from kvsched.core.kvcache.keys import chain_keys, pack_tokens
from kvsched.core.kvcache.prefix import hold_prefix, lock_prefix
from kvsched.core.kvcache.request_cache import RequestCache
from kvsched.core.kvcache.types import DEVICE, HOST
from kvsched.core.request import Request

#: ``(request, root key, number of whole blocks) -> their chained keys``, or None: hash the tokens.
#: For a caller that knows how its prompts are built (the simulator keys a trace prompt per trace
#: block); it must return exactly what ``keys.chain_keys`` returns for those tokens.
PromptKeys = Callable[[Request, bytes, int], "list[bytes] | None"]


def attach_prefix(
    store: BlockStore,
    c: RequestCache,
    req: Request,
    tpb: int,
    reuse: bool,
    source: PromptKeys | None = None,
    lock: bool = False,
) -> int:
    """Look the context minus its last token up; hold (or lock) the matched blocks; set the positions.

    The keys are computed on the first lookup only (by ``source`` if it knows them, else hashed);
    a repeated one is dict probes. With ``lock`` (the caller's resume has no usage cap), blocks
    that need no copy are locked in the same pass and the cache is active on return, as
    ``resume_cache`` would leave it (``prefix.lock_prefix``). Returns how many matched blocks
    are on the host tier (for ``count_reuse``).
    """
    c.pending = False
    reused = on_host = 0
    locked = lock
    if reuse:
        keys = c.keys
        if keys is None:
            nfull = (req.num_context_tokens - 1) // tpb
            if source is not None:
                keys = source(req, c.root, nfull)
                if keys is not None and len(keys) != nfull:
                    raise ConfigError(
                        f"request {req.request_id}: the prompt-keys source returned {len(keys)} keys "
                        f"for {nfull} whole blocks"
                    )
            if keys is None:
                keys = chain_keys(c.root, pack_tokens(req.token_slice(0, nfull * tpb)), tpb * 4)
            c.keys = keys
        if lock:
            blocks, on_host, locked = lock_prefix(store, keys)
        else:
            blocks, on_host = hold_prefix(store, keys)
        reused = len(blocks) * tpb
        c.blocks = blocks
        c.last_key = keys[len(blocks) - 1] if blocks else c.root
    if locked:
        c.table = [p.slot for p in c.blocks]
        c.active = True
    c.capacity = c.history = c.committed = c.num_reused = c.alloc_tokens = reused
    req.context_current_position = reused
    req.num_reused_tokens = reused
    return on_host


def count_reuse(store: BlockStore, c: RequestCache, req: Request, tpb: int, on_host: int) -> None:
    """Add an admitted context's lookup to the hit/miss counters (``discard_cache`` takes it back)."""
    hits = len(c.blocks)
    counted = (hits - on_host, on_host, len(c.keys or ()) - hits, req.num_context_tokens - hits * tpb)
    _add_counts(store, counted, tpb, 1)
    c.counted = counted


def _add_counts(store: BlockStore, counted: tuple[int, int, int, int], tpb: int, sign: int) -> None:
    on_device, on_host, miss_blocks, miss_tokens = counted
    counters = store.counters
    counters.reuse_hit_blocks_device += sign * on_device
    counters.reuse_hit_blocks_host += sign * on_host
    counters.reuse_hit_tokens_device += sign * on_device * tpb
    counters.reuse_hit_tokens_host += sign * on_host * tpb
    counters.reuse_miss_blocks += sign * miss_blocks
    counters.reuse_miss_tokens += sign * miss_tokens


def resume_cache(store: BlockStore, c: RequestCache, max_util: float) -> bool:
    """Bring every block of a held cache to the device and lock it; False (no change) if short."""
    device = store.device
    if max_util < 1.0 and (device.size - device.available) / device.size > max_util:
        return False
    blocks = c.blocks
    onboard = [p for p in blocks if p.tier == HOST]
    if onboard:
        # Our own parked blocks must not be pushed to the host to make room for the others.
        parked = store.parked
        mine = [p for p in blocks if p in parked]
        for p in mine:
            del parked[p]
        if not store.reserve(DEVICE, len(onboard)):
            for p in mine:
                parked[p] = None
            return False
        try:
            store.migrate(onboard, DEVICE)
        except KVTransferError as exc:  # nothing moved: the cache stays suspended as it was
            for p in mine:
                parked[p] = None
            exc.request_id = c.request_id
            raise
    parked = store.parked
    newly_locked = 0
    for p in blocks:
        if not p.locks:
            newly_locked += 1
            if parked and p in parked:
                del parked[p]
        p.locks += 1
        p.holds -= 1
    store.num_locked += newly_locked
    c.table = [p.slot for p in blocks]
    c.active = True
    if c.was_suspended:
        c.was_suspended = False
        store.counters.num_resumes += 1
    return True


def suspend_cache(store: BlockStore, c: RequestCache) -> None:
    """Locks become holds; blocks no other active request uses go to the host (one batched copy).

    The copy runs before any count changes, so a failed one leaves the cache active as it was."""
    blocks = c.blocks
    movable = [p for p in blocks if p.locks == 1]  # locked by this request only
    n = min(len(movable), store.host.available)
    if n:
        try:
            store.migrate(movable[:n], HOST)
        except KVTransferError as exc:  # nothing moved, nothing counted: nothing to undo
            exc.request_id = c.request_id
            raise
    for p in blocks:
        p.locks -= 1
        p.holds += 1
        if p.locks == 0:
            store.num_locked -= 1
    for p in movable[n:]:
        store.parked[p] = None  # no host room now: moved later if the device needs the room
    c.active = False
    c.was_suspended = True
    c.table = []
    store.counters.num_suspends += 1


def suspend_fits(store: BlockStore, c: RequestCache) -> bool:
    """The host tier can take every block of ``c`` that no other active request locks."""
    movable = 0
    for p in c.blocks:
        if p.locks == 1:
            movable += 1
    return movable <= store.host.available


def discard_cache(store: BlockStore, c: RequestCache, req: Request, tpb: int) -> None:
    """Let go of a fresh cache (only a reused prefix, nothing computed); redo the lookup later.

    Its reuse counts are taken back: the context counts again (once) when it is admitted for real.
    """
    if c.counted is not None:
        _add_counts(store, c.counted, tpb, -1)
        c.counted = None
    store.release_many(c.blocks, c.active, c.priority)
    c.blocks = []
    c.table = []
    c.capacity = c.history = c.committed = c.num_reused = c.alloc_tokens = 0
    c.last_key = c.root
    c.active = False
    c.pending = True
    req.context_current_position = 0
    req.num_reused_tokens = 0
