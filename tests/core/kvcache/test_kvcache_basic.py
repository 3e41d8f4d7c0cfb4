"""Allocation, growth, advance, free, revert, block tables, errors (reuse off unless stated)."""

import numpy as np
import pytest

from kvc_helpers import decode, make, req, run_context
from kvsched.core.config import CacheConfig
from kvsched.core.errors import (
    ConfigError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
    UnknownRequestError,
    UnsupportedFeatureError,
)
from kvsched.core.kvcache import KVCacheManager, MetadataStorage
from kvsched.core.kvcache.invariants import check_invariants


def test_fresh_manager_counts():
    m = make(tpb=4, device=8, host=3)
    assert (m.tokens_per_block, m.num_device_blocks, m.num_host_blocks) == (4, 8, 3)
    assert (m.num_free_device_blocks, m.num_free_host_blocks) == (8, 3)
    assert m.device_usage() == 0.0
    s = m.stats()
    assert (s.free_device_blocks, s.used_device_blocks, s.cached_device_blocks) == (8, 0, 0)


@pytest.mark.parametrize(("prompt", "blocks"), [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_context_allocates_whole_blocks(prompt, blocks):
    m = make(tpb=4, device=8)
    r = req(1, prompt)
    assert m.prepare_context(r)
    assert m.capacity(r) == 0 and m.block_table(r) == []
    assert m.resize_context(r, prompt)
    assert m.capacity(r) == prompt
    assert len(m.block_table(r)) == blocks
    assert m.num_free_device_blocks == 8 - blocks
    check_invariants(m)


def test_resize_never_shrinks_and_counts_from_position():
    m = make(tpb=4, device=8)
    r = req(1, 12)
    m.prepare_context(r)
    assert m.resize_context(r, 6)
    assert m.resize_context(r, 2)
    assert m.capacity(r) == 6
    m.advance(r, 6)
    r.context_current_position = 6
    assert m.resize_context(r, 6)
    assert m.capacity(r) == 12 and len(m.block_table(r)) == 3


def test_decode_grows_a_block_only_at_boundaries():
    m = make(tpb=4, device=8)
    r = req(1, 3, max_new=10)
    run_context(m, r)
    assert m.history(r) == 3 and len(m.block_table(r)) == 1
    assert decode(m, r)  # position 3: still block 0
    assert len(m.block_table(r)) == 1 and m.capacity(r) == 4
    assert decode(m, r)  # position 4: new block
    assert len(m.block_table(r)) == 2 and m.history(r) == 5


def test_generation_counts_draft_tokens_and_is_idempotent():
    m = make(tpb=4, device=8)
    r = req(1, 4, max_new=10)
    run_context(m, r)
    r.draft_tokens = [1, 2, 3]
    assert m.try_allocate_generation(r)
    assert m.capacity(r) == 4 + 1 + 3 and len(m.block_table(r)) == 2
    assert m.try_allocate_generation(r)
    assert m.capacity(r) == 8


def test_exact_fit_then_failure_changes_nothing():
    m = make(tpb=4, device=2)
    r = req(1, 8, max_new=1)
    assert m.prepare_context(r) and m.resize_context(r, 8)
    assert m.num_free_device_blocks == 0
    r2 = req(2, 2, max_new=1)
    assert m.prepare_context(r2)
    assert not m.resize_context(r2, 2)
    assert m.capacity(r2) == 0 and m.num_free_device_blocks == 0
    check_invariants(m)


def test_advance_limits_and_commit_off_without_reuse():
    m = make(tpb=4, device=8)
    r = req(1, 8)
    m.prepare_context(r)
    m.resize_context(r, 5)
    with pytest.raises(InvalidRequestError):
        m.advance(r, 6)
    with pytest.raises(InvalidRequestError):
        m.advance(r, -1)
    assert m.history(r) == 0
    m.advance(r, 5)
    assert (m.history(r), m.committed(r)) == (5, 0)


def test_free_returns_every_block_and_forgets_the_request():
    m = make(tpb=4, device=8)
    r = req(1, 9)
    run_context(m, r)
    m.free_request(r)
    assert m.num_free_device_blocks == 8 and not m.has_request(1)
    with pytest.raises(UnknownRequestError):
        m.free_request(r)
    with pytest.raises(UnknownRequestError):
        m.advance(r, 1)
    with pytest.raises(UnknownRequestError):
        m.block_table(r)
    assert not m.try_allocate_generation(r)
    assert not m.resize_context(r, 1)
    assert not m.is_request_active(1)
    m.suspend_request(r)  # no-op for unknown ids, as in TensorRT-LLM's KVCacheManagerV2 (PR #11939)


def test_revert_gives_back_blocks_above_history():
    m = make(tpb=4, device=8)
    r = req(1, 4, max_new=20)
    run_context(m, r)
    r.draft_tokens = [0] * 6
    assert m.try_allocate_generation(r)
    assert len(m.block_table(r)) == 3
    m.revert(r, 0)
    assert m.capacity(r) == 4 and len(m.block_table(r)) == 1
    assert m.num_free_device_blocks == 7
    m.revert(r, 100)  # never grows
    assert m.capacity(r) == 4
    check_invariants(m)


def test_block_tables_are_padded_with_zero():
    m = make(tpb=4, device=8)
    a, b = req(1, 9), req(2, 2)
    run_context(m, a)
    run_context(m, b)
    t = m.build_block_tables([a, b], 4)
    assert t.dtype == np.int32 and t.shape == (2, 4)
    assert t[0].tolist() == m.block_table(a) + [0]
    assert t[1].tolist() == m.block_table(b) + [0, 0, 0]
    with pytest.raises(InvalidRequestError):
        m.build_block_tables([a], 2)


def test_request_larger_than_the_pool_is_rejected_without_state_change():
    m = make(tpb=4, device=2)
    with pytest.raises(RequestTooLargeError):
        m.prepare_context(req(1, 9, max_new=1))
    with pytest.raises(RequestTooLargeError):
        m.prepare_context(req(2, 4, max_new=6))  # prompt fits, prompt + generation does not
    assert not m.has_request(1) and not m.has_request(2)
    r = req(3, 4, max_new=5)  # 4 + 5 - 1 = 8 tokens: exactly the pool
    run_context(m, r)
    r.draft_tokens = [1, 2, 3, 4, 5]
    with pytest.raises(RequestTooLargeError):
        m.try_allocate_generation(r)
    assert m.capacity(r) == 4


def test_duplicate_id_and_beam_search_are_rejected():
    m = make()
    a = req(1, 4)
    assert m.prepare_context(a)
    assert m.prepare_context(a)  # same request again: fine
    with pytest.raises(DuplicateRequestError):
        m.prepare_context(req(1, 4))

    class Beam:
        request_id = 9
        beam_width = 2
        num_context_tokens = 4

    with pytest.raises(UnsupportedFeatureError):
        m.prepare_context(Beam())
    assert not m.has_request(9)


def test_bad_config_and_storage():
    with pytest.raises(ConfigError):
        CacheConfig(tokens_per_block=0)
    with pytest.raises(ConfigError):
        KVCacheManager({"tokens_per_block": 4})
    with pytest.raises(ConfigError):
        KVCacheManager(CacheConfig(), storage=object())
    with pytest.raises(ConfigError):
        MetadataStorage(-1)


def test_block_table_of_suspended_request_is_an_error():
    m = make(tpb=4, device=8, host=8)
    r = req(1, 5)
    run_context(m, r)
    m.suspend_request(r)
    with pytest.raises(InvalidRequestError):
        m.block_table(r)
    with pytest.raises(InvalidRequestError):
        m.advance(r, 1)


def test_invariant_checker_catches_corruption():
    m = make(tpb=4, device=4, host=2, reuse=True)
    r = req(1, 9)
    run_context(m, r)
    store = m._store
    store.device.free.append(m.block_table(r)[0])  # a used slot handed out again
    with pytest.raises(AssertionError, match="owned twice"):
        check_invariants(m)
    store.device.free.pop()
    m._caches[1].table[0] = 3  # table no longer mirrors the blocks
    with pytest.raises(AssertionError, match="stale table"):
        check_invariants(m)
    m._caches[1].table[0] = m._caches[1].blocks[0].slot
    m._caches[1].blocks[0].locks += 1
    with pytest.raises(AssertionError, match="refcount"):
        check_invariants(m)
