"""KVCacheManager: the scheduling API of TensorRT-LLM's KVCacheManagerV2 (PR #11939) over a two-tier paged block store (see lifecycle.py
for the suspend policy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvsched.core.config import CacheConfig
from kvsched.core.errors import (
    ConfigError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
    UnknownRequestError,
    UnsupportedFeatureError,
)
from kvsched.core.kvcache.block_store import BlockStore
from kvsched.core.kvcache.keys import cached_root_key
from kvsched.core.kvcache.lifecycle import (
    PromptKeys,
    attach_prefix,
    count_reuse,
    discard_cache,
    resume_cache,
    suspend_cache,
    suspend_fits,
)
from kvsched.core.kvcache.prefix import commit_blocks, match_prefix
from kvsched.core.kvcache.request_cache import RequestCache
from kvsched.core.kvcache.storage import KVStorage, MetadataStorage, TieredKVStorage
from kvsched.core.kvcache.types import DEVICE, KVCacheStats, KVEvent
from kvsched.core.request import Request


class KVCacheManager:
    """Paged KV cache with a device and a host tier, prefix reuse and suspend/resume."""

    __slots__ = ("_config", "_tpb", "_reuse", "_store", "_caches", "_max_util", "_prompt_keys")

    def __init__(self, config: CacheConfig, storage: KVStorage | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"config must be a CacheConfig, got {type(config).__name__}")
        if storage is None:
            storage = MetadataStorage()
        elif not isinstance(storage, KVStorage):
            raise ConfigError("storage must provide copy_blocks(...) and bytes_per_block")
        if isinstance(storage, TieredKVStorage):
            for attr, have, want in (
                ("num_device_blocks", storage.num_device_blocks, config.num_device_blocks),
                ("num_host_blocks", storage.num_host_blocks, config.num_host_blocks),
            ):
                if have < want:
                    raise ConfigError(f"storage has {attr}={have}, fewer than the config's {want}")
        self._config = config
        self._tpb = config.tokens_per_block
        self._reuse = bool(config.enable_block_reuse)
        self._store = BlockStore(
            config.num_device_blocks, config.num_host_blocks, storage, config.enable_kv_events
        )
        self._caches: dict[int, RequestCache] = {}
        self._max_util = config.max_util_for_resume
        self._prompt_keys: PromptKeys | None = None

    def set_prompt_keys(self, source: PromptKeys | None) -> None:
        """Take prompts' block keys from ``source`` when it knows them (None: hash the tokens);
        see ``lifecycle.PromptKeys``. The simulator's is ``sim/prompt_keys.py``."""
        self._prompt_keys = source

    # -- scheduling API (KVCacheManagerV2's, TensorRT-LLM PR #11939) -----------------------------
    def prepare_context(self, req: Request) -> bool:
        """Create the cache on the first chunk (with prefix lookup), or resume it; never grows."""
        c = self._caches.get(req.request_id)
        if c is None:
            c = self._new_cache(req)
        elif c.req is not req:
            raise DuplicateRequestError(f"request id {req.request_id} already has a KV cache")
        if c.pending:
            store, no_cap = self._store, self._max_util >= 1.0  # no cap: locked in the lookup's pass
            on_host = attach_prefix(store, c, req, self._tpb, self._reuse, self._prompt_keys, no_cap)
            if c.active or resume_cache(store, c, self._max_util):
                if self._reuse:
                    count_reuse(self._store, c, req, self._tpb, on_host)
                return True
            discard_cache(self._store, c, req, self._tpb)
            return False
        return c.active or resume_cache(self._store, c, self._max_util)

    def resize_context(self, req: Request, num_tokens: int) -> bool:
        """Grow capacity to ``context_current_position + num_tokens``; a failed first chunk lets go."""
        c = self._caches.get(req.request_id)
        if c is None or not c.active:
            return False
        if num_tokens < 0:
            raise InvalidRequestError(f"request {req.request_id}: resize_context by {num_tokens} < 0")
        target = req.context_current_position + num_tokens
        if target <= c.capacity:
            return True
        if target <= c.alloc_tokens:
            c.capacity = target
            return True
        if self._grow(c, target):
            return True
        if c.history == c.num_reused:
            discard_cache(self._store, c, req, self._tpb)
        return False

    def try_allocate_generation(self, req: Request) -> bool:
        """Resume if suspended, then make room for this decode step: ``1 + len(draft_tokens)`` tokens.

        Capacity becomes ``max(capacity, history + 1 + drafts)``: a repeated call before ``advance``
        does not grow twice (use ``revert`` to give back a step that was dropped).
        """
        c = self._caches.get(req.request_id)
        if c is None:
            return False
        if not c.active and (c.pending or not resume_cache(self._store, c, self._max_util)):
            return False
        drafts = req.draft_tokens
        need = c.history + 1 + len(drafts) if drafts else c.history + 1
        if need <= c.capacity:
            return True
        if need <= c.alloc_tokens:
            c.capacity = need
            return True
        return self._grow(c, need)

    def suspend_request(self, req: Request) -> None:
        """Move the request's device-only blocks to the host tier; no-op when not active."""
        c = self._caches.get(req.request_id)
        if c is None or not c.active:
            return
        if c.history == c.num_reused:
            discard_cache(self._store, c, req, self._tpb)
            return
        suspend_cache(self._store, c)

    def can_suspend(self, req: Request) -> bool:
        """Would :meth:`suspend_request` free the request's device blocks now?

        True for an active request whose blocks that no other active request uses fit the host tier
        (free plus evictable cached host blocks), and for a fresh cache (it is let go, not copied).
        False when the host cannot take them: they would stay parked on the device.
        """
        c = self._caches.get(req.request_id)
        if c is None or not c.active:
            return False
        return c.history == c.num_reused or suspend_fits(self._store, c)

    def is_request_active(self, request_id: int) -> bool:
        c = self._caches.get(request_id)
        return c is not None and c.active

    # -- executor API --------------------------------------------------------------------------
    def advance(self, req: Request, num_tokens: int) -> None:
        """``num_tokens`` more tokens of KV were written; with reuse on, full blocks get published."""
        c = self._caches.get(req.request_id)
        if c is None:
            raise UnknownRequestError(f"request {req.request_id} has no KV cache")
        h = c.history + num_tokens
        if num_tokens < 0 or h > c.capacity or not c.active:
            raise InvalidRequestError(
                f"request {req.request_id}: cannot advance by {num_tokens} (history {c.history}, "
                f"capacity {c.capacity}, active {c.active})"
            )
        c.history = h
        if self._reuse and h - c.committed >= self._tpb:
            commit_blocks(self._store, c, req, self._tpb)

    def free_request(self, req: Request) -> None:
        """Release everything; published blocks stay cached (tail blocks are evicted first)."""
        c = self._caches.pop(req.request_id, None)
        if c is None:
            raise UnknownRequestError(f"request {req.request_id} has no KV cache (unknown or freed)")
        if self._reuse and not c.pending:
            commit_blocks(self._store, c, req, self._tpb)
        self._store.release_many(c.blocks, c.active, c.priority)

    def revert(self, req: Request, capacity: int) -> None:
        """Shrink capacity back to ``max(history, capacity)`` (a step that was grown, then dropped)."""
        c = self._cache(req.request_id)
        new_cap = max(c.history, capacity)
        if new_cap >= c.capacity:
            return
        nb = -(-new_cap // self._tpb)
        extra = c.blocks[nb:]
        del c.blocks[nb:]
        if c.active:
            del c.table[nb:]
        self._store.release_many(extra, c.active, c.priority)
        c.capacity = new_cap
        c.alloc_tokens = nb * self._tpb

    def block_table(self, req: Request) -> list[int]:
        """Device block ids of an active request, one per block of its capacity."""
        c = self._cache(req.request_id)
        if not c.active:
            raise InvalidRequestError(f"request {req.request_id} is suspended: it has no device blocks")
        return list(c.table)

    def build_block_tables(self, reqs: Sequence[Request], width: int) -> np.ndarray:
        """``[len(reqs), width]`` int32 block tables, padded with 0 (a valid index, never read)."""
        out = np.zeros((len(reqs), width), dtype=np.int32)
        for i, req in enumerate(reqs):
            c = self._cache(req.request_id)
            t = c.table
            if not c.active or len(t) > width:
                raise InvalidRequestError(
                    f"request {req.request_id}: block table of {len(t)} blocks (active {c.active}) "
                    f"does not fit width {width}"
                )
            if t:
                out[i, : len(t)] = t
        return out

    # -- introspection -------------------------------------------------------------------------
    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def tokens_per_block(self) -> int:
        return self._tpb

    @property
    def num_device_blocks(self) -> int:
        return self._store.device.size

    @property
    def num_host_blocks(self) -> int:
        return self._store.host.size

    @property
    def num_free_device_blocks(self) -> int:
        """Device blocks that could be allocated now: free plus evictable cached ones."""
        return self._store.device.available

    @property
    def num_free_host_blocks(self) -> int:
        return self._store.host.available

    def device_usage(self) -> float:
        """Fraction of device blocks locked by active requests."""
        return self._store.num_locked / self._store.device.size

    def has_request(self, request_id: int) -> bool:
        return request_id in self._caches

    def capacity(self, req: Request) -> int:
        return self._cache(req.request_id).capacity

    def history(self, req: Request) -> int:
        return self._cache(req.request_id).history

    def committed(self, req: Request) -> int:
        return self._cache(req.request_id).committed

    def stats(self) -> KVCacheStats:
        from kvsched.core.kvcache.invariants import snapshot_stats

        return snapshot_stats(self._store, self._caches)

    def probe_reuse(self, req: Request) -> int:
        """Tokens of ``req``'s context (minus its last token) that are cached now; holds nothing."""
        if not self._reuse:
            return 0
        root = cached_root_key(req.lora_id, req.cache_salt)
        nfull = (req.num_context_tokens - 1) // self._tpb
        blocks, _ = match_prefix(self._store.index, root, req.token_slice(0, nfull * self._tpb), self._tpb)
        return len(blocks) * self._tpb

    def clear_cached_blocks(self) -> int:
        """Drop every cached block nobody holds, on both tiers (cold-cache runs); returns how many."""
        return self._store.drop_all_cached()

    def drain_events(self) -> list[KVEvent]:
        events = list(self._store.events)
        self._store.events.clear()
        return events

    # -- internals -----------------------------------------------------------------------------
    def _cache(self, request_id: int) -> RequestCache:
        c = self._caches.get(request_id)
        if c is None:
            raise UnknownRequestError(f"request {request_id} has no KV cache (unknown or freed)")
        return c

    def _new_cache(self, req: Request) -> RequestCache:
        """Validate a new request (no state changes on error) and register an empty, pending cache."""
        rid = req.request_id
        if req.beam_width != 1:
            raise UnsupportedFeatureError(f"request {rid}: beam width {req.beam_width} > 1 is not supported")
        n_ctx = req.num_context_tokens
        if n_ctx < 1:
            raise InvalidRequestError(f"request {rid}: empty context")
        remaining = req.max_new_tokens - len(req.output_token_ids)
        worst = n_ctx + max(0, remaining - 1)
        nblocks = -(-worst // self._tpb)
        if nblocks > self._store.device.size:
            raise RequestTooLargeError(
                f"request {rid}: up to {worst} tokens of KV need {nblocks} blocks, more than the "
                f"{self._store.device.size} blocks of the device pool"
            )
        root = b""
        if self._reuse:
            root = cached_root_key(req.lora_id, req.cache_salt)
        c = RequestCache(rid, req, root, req.priority, last_key=root)
        self._caches[rid] = c
        return c

    def _grow(self, c: RequestCache, need: int) -> bool:
        """Add device blocks so that capacity reaches ``need``; all or nothing."""
        tpb = self._tpb
        nb = -(-need // tpb)
        store = self._store
        if nb > store.device.size:
            raise RequestTooLargeError(
                f"request {c.request_id}: {need} tokens need {nb} blocks, more than the "
                f"{store.device.size} blocks of the device pool"
            )
        add = nb - len(c.blocks)
        if not store.reserve(DEVICE, add):
            return False
        blocks, slots = store.new_device_blocks(add)
        c.blocks += blocks
        c.table += slots
        c.capacity = need
        c.alloc_tokens = nb * tpb
        return True
