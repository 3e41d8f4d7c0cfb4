"""Suspend / resume: data movement, shared blocks, clean failures, fresh first chunks."""

from kvc_helpers import decode, make, req, run_context
from kvsched.core.kvcache import MetadataStorage
from kvsched.core.kvcache.invariants import check_invariants


def test_suspend_moves_blocks_to_host_and_resume_brings_them_back():
    m = make(tpb=4, device=4, host=4, storage=MetadataStorage(100))
    r = req(1, 9, max_new=4)
    run_context(m, r)
    m.suspend_request(r)
    assert not m.is_request_active(1) and m.has_request(1)
    assert m.num_free_device_blocks == 4 and m.num_free_host_blocks == 1
    m.suspend_request(r)  # no-op when already suspended
    assert m.stats().num_suspends == 1
    assert decode(m, r)  # resumes, then grows
    assert m.is_request_active(1) and len(m.block_table(r)) == 3
    s = m.stats()
    assert (s.num_suspends, s.num_resumes, s.offload_blocks, s.onboard_blocks) == (1, 1, 3, 3)
    assert s.copied_bytes == 600
    check_invariants(m)


def test_prepare_context_resumes_a_later_chunk():
    m = make(tpb=4, device=4, host=4)
    r = req(1, 12, max_new=1)
    assert m.prepare_context(r) and m.resize_context(r, 4)
    m.advance(r, 4)
    r.context_current_position = 4
    m.suspend_request(r)
    assert not m.resize_context(r, 4)  # suspended: no growth
    assert m.prepare_context(r) and m.is_request_active(1)
    assert r.context_current_position == 4
    assert m.resize_context(r, 8) and m.capacity(r) == 12


def test_resume_fails_cleanly_when_device_is_short():
    m = make(tpb=4, device=3, host=4)
    a = req(1, 8, max_new=1)
    run_context(m, a)
    m.suspend_request(a)
    b = req(2, 8, max_new=1)
    run_context(m, b)  # takes 2 of 3 device blocks
    before = m.stats()
    assert not m.try_allocate_generation(a)
    after = m.stats()
    assert not m.is_request_active(1)
    assert (after.used_host_blocks, after.free_device_blocks) == (before.used_host_blocks, 1)
    m.free_request(b)
    assert m.try_allocate_generation(a)
    check_invariants(m)


def test_without_host_tier_suspend_keeps_blocks_on_device():
    m = make(tpb=4, device=4, host=0)
    r = req(1, 8, max_new=2)
    run_context(m, r)
    table = m.block_table(r)
    m.suspend_request(r)
    assert not m.is_request_active(1) and m.num_free_device_blocks == 2
    assert m.try_allocate_generation(r) and m.block_table(r)[:2] == table


def test_partial_host_room_moves_what_fits():
    m = make(tpb=4, device=4, host=1)
    r = req(1, 12, max_new=1)
    run_context(m, r)
    m.suspend_request(r)
    s = m.stats()
    assert (s.used_host_blocks, s.used_device_blocks, s.offload_blocks) == (1, 2, 1)
    assert m.try_allocate_generation(r)
    check_invariants(m)


def test_shared_blocks_stay_on_device_for_the_active_sharer():
    m = make(tpb=4, device=6, host=4, reuse=True)
    a = req(1, list(range(9)), max_new=2)
    run_context(m, a)
    b = req(2, list(range(9)), max_new=2)
    run_context(m, b)  # shares 2 blocks with a
    shared = m.block_table(b)[:2]
    m.suspend_request(a)
    assert m.block_table(b)[:2] == shared  # never moved from under b
    s = m.stats()
    assert s.offload_blocks == 1 and s.used_host_blocks == 1
    m.free_request(b)  # shared blocks now held only by suspended a: they stay (held), not cached
    s = m.stats()
    assert s.cached_device_blocks == 0 and s.used_device_blocks == 2
    filler = req(3, [90] * 8, max_new=1)
    run_context(m, filler)
    assert m.try_allocate_generation(a)
    assert m.block_table(a)[:2] == shared
    check_invariants(m)


def test_suspended_published_blocks_can_be_hit_by_another_request():
    m = make(tpb=4, device=4, host=4, reuse=True)
    a = req(1, list(range(9)), max_new=2)
    run_context(m, a)
    m.suspend_request(a)  # its 2 published blocks go to the host, still held
    b = req(2, list(range(9)), max_new=2)
    assert m.prepare_context(b) and b.context_current_position == 8
    assert m.stats().reuse_hit_blocks_host == 2
    check_invariants(m)
    assert m.try_allocate_generation(a)  # blocks were brought up by b: only a's tail moves
    assert m.block_table(a)[:2] == m.block_table(b)[:2]
    check_invariants(m)


def test_failed_first_chunk_lets_go_of_the_reused_prefix():
    m = make(tpb=4, device=4, reuse=True)
    a = req(1, list(range(9)), max_new=1)
    run_context(m, a)
    m.free_request(a)  # 2 cached blocks
    hog = req(2, [90] * 4, max_new=1)
    run_context(m, hog)
    hog2 = req(3, [91] * 4, max_new=1)
    run_context(m, hog2)  # device: 2 used, 2 cached (a's prefix)
    b = req(4, list(range(8)) + [5] * 8, max_new=1)
    assert m.prepare_context(b) and b.context_current_position == 8  # holds a's 2 blocks
    assert not m.resize_context(b, 8)  # needs 2 more blocks: none
    assert not m.is_request_active(4) and m.has_request(4)
    assert (b.context_current_position, b.num_reused_tokens) == (0, 0)
    assert m.stats().cached_device_blocks == 2  # the prefix is cached again, not copied anywhere
    m.free_request(hog)
    m.free_request(hog2)
    assert m.prepare_context(b) and b.context_current_position == 8  # lookup redone
    assert m.resize_context(b, 8)
    check_invariants(m)


def test_suspending_a_fresh_cache_releases_it():
    m = make(tpb=4, device=4, host=4)
    r = req(1, 8)
    assert m.prepare_context(r) and m.resize_context(r, 8)
    m.suspend_request(r)
    assert m.num_free_device_blocks == 4 and m.stats().offload_blocks == 0
    assert m.prepare_context(r) and m.resize_context(r, 8)


def test_max_util_for_resume_gates_resume():
    m = make(tpb=4, device=4, host=4, max_util_for_resume=0.5)
    a = req(1, 4, max_new=1)
    run_context(m, a)
    m.suspend_request(a)
    b = req(2, 12, max_new=1)
    run_context(m, b)  # 3 of 4 device blocks used: 75 % > 50 %
    assert not m.try_allocate_generation(a)
    m.free_request(b)
    assert m.try_allocate_generation(a)


def test_free_a_suspended_request_releases_host_blocks():
    m = make(tpb=4, device=4, host=4, reuse=True)
    r = req(1, list(range(9)), max_new=1)
    run_context(m, r)
    m.suspend_request(r)
    m.free_request(r)
    s = m.stats()
    assert (s.used_host_blocks, s.cached_host_blocks, s.free_host_blocks) == (0, 2, 2)
    assert s.free_device_blocks == 4
    check_invariants(m)


def test_parked_blocks_move_to_host_once_it_has_room():
    import torch

    from kvsched.core.config import CacheConfig
    from kvsched.core.kvcache import KVCacheManager
    from kvsched.engine.kv_storage import TensorKVStorage

    cfg = CacheConfig(tokens_per_block=4, num_device_blocks=4, num_host_blocks=2)
    s = TensorKVStorage(cfg, num_layers=1, num_kv_heads=1, head_dim=2)
    m = KVCacheManager(cfg, s)
    a, b = req(1, 8, max_new=1), req(2, 8, max_new=1)
    run_context(m, a)
    s.device_kv[0][m.block_table(a)] = 1.0
    m.suspend_request(a)  # host takes both of a's blocks
    run_context(m, b)
    s.device_kv[0][m.block_table(b)] = 2.0
    m.suspend_request(b)  # host full: b's blocks stay parked on the device
    st = m.stats()
    assert (st.used_host_blocks, st.used_device_blocks, st.free_device_blocks) == (2, 2, 2)
    c = req(3, 12, max_new=1)
    assert m.prepare_context(c) and not m.resize_context(c, 12)  # 3 blocks: parked ones cannot move yet
    assert m.try_allocate_generation(a)  # a comes back: the host has room again
    m.free_request(a)
    assert m.prepare_context(c) and m.resize_context(c, 12)  # now one of b's parked blocks moves down
    st = m.stats()
    assert (st.used_host_blocks, st.used_device_blocks, st.offload_blocks) == (1, 4, 3)
    check_invariants(m)
    m.free_request(c)
    assert m.try_allocate_generation(b)
    assert torch.equal(s.device_kv[0][m.block_table(b)[:2]], torch.full((2, 2, 4, 1, 2), 2.0))
    check_invariants(m)
