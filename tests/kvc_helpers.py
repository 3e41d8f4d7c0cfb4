"""Shared builders for the KV-cache tests of core (tests/core/kvcache) and engine (the tensor storage).

Imported by name: tests/ is on sys.path (pytest puts the folder of tests/conftest.py there)."""

from __future__ import annotations

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import Request, RequestState


def make(
    tpb: int = 4, device: int = 8, host: int = 0, reuse: bool = False, storage=None, **kw
) -> KVCacheManager:
    cfg = CacheConfig(
        tokens_per_block=tpb, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=reuse, **kw
    )
    return KVCacheManager(cfg, storage)


def req(rid: int, tokens, max_new: int = 4, **kw) -> Request:
    if isinstance(tokens, int):
        tokens = list(range(100 + rid * 1000, 100 + rid * 1000 + tokens))
    return Request(rid, tokens, max_new, **kw)


def prefill(m: KVCacheManager, r: Request) -> Request:
    """Prefill the whole (remaining) context in one chunk and switch to generation; returns ``r``."""
    assert m.prepare_context(r)
    n = r.context_remaining_length
    assert m.resize_context(r, n)
    m.advance(r, n)
    r.context_current_position += n
    r.state = RequestState.GENERATION_IN_PROGRESS
    return r


def run_context(m: KVCacheManager, r: Request) -> None:
    """:func:`prefill`, then the first output token, and the manager's invariants checked."""
    prefill(m, r)
    r.output_token_ids.append(7)
    check_invariants(m)


def decode(m: KVCacheManager, r: Request, token: int = 7) -> bool:
    if not m.try_allocate_generation(r):
        return False
    m.advance(r, 1)
    r.output_token_ids.append(token)
    check_invariants(m)
    return True
