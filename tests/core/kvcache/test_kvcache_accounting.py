"""KV manager accounting: counters that accumulate, copies that name both tiers, KV events with their
chain keys, parked blocks making exactly enough room, reuse counts taken back, and error messages that
name the problem."""

from __future__ import annotations

import pytest

from kvc_helpers import decode, req, run_context
from kvsched.core.config import CacheConfig
from kvsched.core.errors import (
    ConfigError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
    UnknownRequestError,
)
from kvsched.core.kvcache import KVCacheManager, Tier, block_store
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.keys import chain_keys, pack_tokens, root_key
from kvsched.core.kvcache.types import KVEvent


class RecordingStorage:
    bytes_per_block = 100

    def __init__(self) -> None:
        self.copies: list[tuple[Tier, list[int], Tier, list[int]]] = []

    def copy_blocks(self, src_tier, src, dst_tier, dst) -> None:
        self.copies.append((src_tier, list(src), dst_tier, list(dst)))


def manager(device=4, host=4, reuse=False, storage=None, **kw) -> KVCacheManager:
    cfg = CacheConfig(
        tokens_per_block=4, num_device_blocks=device, num_host_blocks=host, enable_block_reuse=reuse, **kw
    )
    return KVCacheManager(cfg, storage)


def keys_of(tokens, n_blocks, lora=None, salt=None):
    return chain_keys(root_key(lora, salt), pack_tokens(tokens[: 4 * n_blocks]), 16)


# -- counters ----------------------------------------------------------------------------------------
def test_suspend_resume_counters_accumulate_blocks_and_bytes():
    st = RecordingStorage()
    m = manager(storage=st)
    a = req(1, 8, max_new=2)
    run_context(m, a)
    for _ in range(2):
        m.suspend_request(a)
        assert m.try_allocate_generation(a)
    s = m.stats()
    assert (s.num_suspends, s.num_resumes) == (2, 2)
    assert (s.offload_blocks, s.offload_bytes) == (5, 500)  # 2 blocks, then 3 after the decode grew
    assert (s.onboard_blocks, s.onboard_bytes) == (5, 500)
    assert s.allocated_blocks == 3  # 2 for the prompt, 1 for the decode
    b = req(2, 4, max_new=1)
    run_context(m, b)
    assert m.stats().allocated_blocks == 4


def test_copies_name_the_source_and_destination_tiers():
    st = RecordingStorage()
    m = manager(device=4, host=4, reuse=True, storage=st)
    a = req(1, 9, max_new=1)
    run_context(m, a)
    table = m.block_table(a)
    m.suspend_request(a)
    assert st.copies[-1][0] == Tier.DEVICE and st.copies[-1][2] == Tier.HOST
    assert st.copies[-1][1] == table
    assert m.try_allocate_generation(a)
    assert st.copies[-1][0] == Tier.HOST and st.copies[-1][2] == Tier.DEVICE
    m.free_request(a)  # 2 published blocks cached on the device
    st.copies.clear()
    run_context(m, req(2, 16, max_new=1))  # evicts both cached blocks to the host
    assert [(c[0], c[2], len(c[1])) for c in st.copies] == [(Tier.DEVICE, Tier.HOST, 2)]
    s = m.stats()
    assert (s.offload_blocks, s.offload_bytes) == (5, 500)


def test_dropped_blocks_are_counted_across_evictions():
    m = manager(device=4, host=0, reuse=True)
    for rid in (1, 2, 3):
        r = req(rid, 16, max_new=1)
        run_context(m, r)
        m.free_request(r)  # leaves 4 cached blocks; the next request evicts them
    assert m.stats().dropped_device_blocks == 8
    m2 = manager(device=4, host=2, reuse=True)
    for rid in (1, 2, 3):
        r = req(rid, 16, max_new=1)
        run_context(m2, r)
        m2.free_request(r)  # 4 cached; the next request evicts 4: 2 to the host (evicting its 2), 2 dropped
    s = m2.stats()
    assert s.dropped_device_blocks == 4 and s.dropped_host_blocks == 2
    r = req(4, 16, max_new=1)
    run_context(m2, r)  # the host drops again
    assert m2.stats().dropped_host_blocks == 4
    check_invariants(m2)


def test_reuse_counts_split_device_and_host_hits_and_accumulate():
    m = manager(device=4, host=3, reuse=True)
    prompt = list(range(8)) + [99]
    x = req(1, prompt, max_new=1)
    run_context(m, x)
    m.free_request(x)
    w = req(2, 16, max_new=1)
    run_context(m, w)  # x's two blocks go to the host
    m.free_request(w)
    for rid in (3, 4):
        y = req(rid, prompt, max_new=1)
        run_context(m, y)
        m.free_request(y)
    s = m.stats()
    assert (s.reuse_hit_blocks_host, s.reuse_hit_tokens_host) == (2, 8)  # the first hit onboards them
    assert (s.reuse_hit_blocks_device, s.reuse_hit_tokens_device) == (2, 8)  # the second finds them there


def test_a_discarded_first_chunk_takes_its_reuse_counts_back_exactly():
    m = manager(device=4, host=0, reuse=True)
    prompt = list(range(8)) + [99]
    a = req(1, prompt, max_new=1)
    run_context(m, a)
    m.free_request(a)
    holder = req(2, 4, max_new=1)
    run_context(m, holder)  # 1 block locked, 2 cached, 1 free
    b = req(3, prompt + [5, 6, 7, 8], max_new=1)
    assert m.prepare_context(b) and b.num_reused_tokens == 8
    before = m.stats()
    assert (before.reuse_hit_blocks_device, before.reuse_hit_tokens_device) == (2, 8)
    assert not m.resize_context(b, b.context_remaining_length)  # 2 more blocks, 1 free: discarded
    s = m.stats()
    assert (s.reuse_hit_blocks_device, s.reuse_hit_tokens_device, s.reuse_miss_tokens) == (0, 0, 13)
    assert b.num_reused_tokens == 0 and not m.is_request_active(3)


def test_device_usage_is_the_locked_fraction():
    m = manager(device=4)
    run_context(m, req(1, 5, max_new=1))
    assert m.device_usage() == 0.5


# -- events ------------------------------------------------------------------------------------------
def test_events_carry_chain_keys_and_parents_through_publish_offload_and_moves():
    m = manager(device=4, host=4, reuse=True)
    prompt = list(range(8)) + [99]
    k1, k2 = keys_of(prompt, 2)
    a = req(1, prompt, max_new=1)
    run_context(m, a)
    D, H = Tier.DEVICE, Tier.HOST
    assert m.drain_events() == [KVEvent("stored", k1, D, None), KVEvent("stored", k2, D, k1)]
    m.suspend_request(a)
    moved = m.drain_events()
    assert moved[:2] == [KVEvent("removed", k1, D, None), KVEvent("stored", k1, H, None)]
    assert moved[2:] == [KVEvent("removed", k2, D, None), KVEvent("stored", k2, H, None)]
    assert m.try_allocate_generation(a)
    back = m.drain_events()
    assert [(e.kind, e.block_hash, e.tier) for e in back] == [
        ("removed", k1, H), ("stored", k1, D), ("removed", k2, H), ("stored", k2, D)
    ]  # fmt: skip
    m.free_request(a)
    run_context(m, req(2, 16, max_new=1))  # both cached blocks are evicted to the host
    off = [e for e in m.drain_events() if e.block_hash in (k1, k2)]
    assert {(e.kind, e.block_hash, e.tier) for e in off} == {
        ("removed", k1, D), ("stored", k1, H), ("removed", k2, D), ("stored", k2, H)
    }  # fmt: skip
    assert m.drain_events() == []


def test_the_event_queue_keeps_only_the_newest(monkeypatch):
    monkeypatch.setattr(block_store, "MAX_EVENTS", 3)
    m = manager(device=8, host=0, reuse=True)
    prompt = list(range(20)) + [99]
    run_context(m, req(1, prompt, max_new=1))  # 5 published blocks
    events = m.drain_events()
    assert [e.block_hash for e in events] == keys_of(prompt, 5)[2:]
    assert m.stats().num_events == 5


# -- moves that make room ----------------------------------------------------------------------------
def test_parked_blocks_make_exactly_the_room_that_was_missing():
    m = manager(device=4, host=2)
    a, b = req(1, 8, max_new=1), req(2, 8, max_new=1)
    run_context(m, a)
    m.suspend_request(a)  # host full
    run_context(m, b)
    m.suspend_request(b)  # parked on the device
    assert m.try_allocate_generation(a)
    m.free_request(a)  # host has 2 free slots, device 2 free + 2 parked
    c = req(3, 16, max_new=1)
    assert m.prepare_context(c) and m.resize_context(c, 16)  # both parked blocks move, exactly
    s = m.stats()
    assert (s.used_host_blocks, s.used_device_blocks) == (2, 4)
    check_invariants(m)


def test_clearing_cached_blocks_frees_both_tiers_to_their_own_pool():
    m = manager(device=4, host=4, reuse=True)
    a = req(1, 9, max_new=1)
    run_context(m, a)
    m.free_request(a)
    run_context(m, w := req(2, 16, max_new=1))  # a's blocks now cached on the host
    m.free_request(w)
    s = m.stats()
    assert (s.cached_host_blocks, s.cached_device_blocks) == (2, 4)
    assert m.clear_cached_blocks() == 6
    s = m.stats()
    assert (s.free_host_blocks, s.free_device_blocks, s.cached_host_blocks) == (4, 4, 0)
    check_invariants(m)
    run_context(m, req(3, 16, max_new=1))
    check_invariants(m)


# -- reuse chains ------------------------------------------------------------------------------------
def test_blocks_committed_after_a_partial_match_chain_from_the_matched_prefix():
    m = manager(device=16, host=0, reuse=True)
    base = list(range(8))
    a = req(1, base + [99], max_new=1)
    run_context(m, a)
    m.free_request(a)
    longer = base + list(range(50, 58)) + [98]
    b = req(2, longer, max_new=1)
    run_context(m, b)
    assert b.num_reused_tokens == 8 and m.committed(b) == 16
    m.free_request(b)
    c = req(3, longer, max_new=1)
    assert m.prepare_context(c) and c.num_reused_tokens == 16


def test_free_publishes_a_block_whose_tokens_arrived_after_its_kv():
    m = manager(device=8, host=0, reuse=True)
    a = req(1, list(range(3)), max_new=8)
    run_context(m, a)
    a.draft_tokens = [5, 6, 7, 8]
    assert m.try_allocate_generation(a)
    m.advance(a, 5)  # block 1 (tokens 4..7) is written but its tokens are not appended yet
    assert m.committed(a) == 4
    a.output_token_ids += [5, 6, 7, 8, 9]
    a.draft_tokens = []
    m.free_request(a)
    b = req(2, a.prompt_token_ids + a.output_token_ids[:5] + [1], max_new=1)
    assert m.prepare_context(b) and b.num_reused_tokens == 8


def test_probe_and_lookup_are_scoped_by_cache_salt_and_adapter():
    m = manager(device=8, host=0, reuse=True)
    prompt = list(range(8)) + [99]
    run_context(m, a := req(1, prompt, max_new=1, cache_salt=7))
    m.free_request(a)
    assert m.probe_reuse(req(2, prompt, cache_salt=7)) == 8
    assert m.probe_reuse(req(3, prompt)) == 0
    assert m.probe_reuse(req(4, prompt, cache_salt=8)) == 0
    assert m.probe_reuse(req(5, prompt, cache_salt=7, lora_id=1)) == 0


# -- edges of the API --------------------------------------------------------------------------------
def test_resize_by_zero_and_advance_by_zero_are_no_ops():
    m = manager()
    r = req(1, 8, max_new=2)
    assert m.prepare_context(r) and m.resize_context(r, 0) and m.capacity(r) == 0
    assert m.resize_context(r, 8)
    m.advance(r, 0)
    assert m.history(r) == 0


def test_a_fresh_request_is_not_admitted_above_the_resume_limit():
    m = manager(device=4, host=4, max_util_for_resume=0.5)
    run_context(m, req(1, 12, max_new=1))  # 3 of 4 blocks
    fresh = req(2, 4, max_new=1)
    assert not m.prepare_context(fresh) and not m.is_request_active(2)
    assert not m.resize_context(fresh, 4)


def test_block_tables_fill_exactly_their_width():
    m = manager(device=8)
    r = req(1, 8, max_new=1)
    run_context(m, r)
    assert m.build_block_tables([r], 2).tolist() == [m.block_table(r)]
    with pytest.raises(InvalidRequestError, match="block table of 2 blocks .* does not fit width 1"):
        m.build_block_tables([r], 1)


def test_a_recomputed_request_needs_room_only_for_its_remaining_tokens():
    m = manager(device=3, host=0)
    r = req(1, 8, max_new=4)
    r.output_token_ids = [1, 2, 3]
    r.reset_for_recompute()  # context 11 tokens, 1 token left to generate: 11 tokens of KV at most
    assert m.prepare_context(r)


def test_decode_after_free_is_unknown():
    m = manager()
    r = req(1, 4, max_new=3)
    run_context(m, r)
    assert decode(m, r)
    m.free_request(r)
    with pytest.raises(UnknownRequestError, match="request 1 has no KV cache"):
        m.advance(r, 1)
    with pytest.raises(UnknownRequestError, match=r"request 1 has no KV cache \(unknown or freed\)"):
        m.free_request(r)
    with pytest.raises(UnknownRequestError, match=r"request 1 has no KV cache \(unknown or freed\)"):
        m.capacity(r)


def test_construction_errors_name_the_problem():
    cfg = CacheConfig(tokens_per_block=4, num_device_blocks=4, num_host_blocks=2)
    with pytest.raises(ConfigError, match="config must be a CacheConfig, got dict"):
        KVCacheManager({})  # type: ignore[arg-type]

    class CopyOnly:
        def copy_blocks(self, *a):
            pass

    with pytest.raises(
        ConfigError, match=r"^storage must provide copy_blocks\(\.\.\.\) and bytes_per_block$"
    ):
        KVCacheManager(cfg, CopyOnly())  # type: ignore[arg-type]

    class Small(RecordingStorage):
        num_device_blocks = 2
        num_host_blocks = 2

    with pytest.raises(ConfigError, match="storage has num_device_blocks=2, fewer than the config's 4"):
        KVCacheManager(cfg, Small())  # type: ignore[arg-type]

    class SmallHost(RecordingStorage):
        num_device_blocks = 4
        num_host_blocks = 1

    with pytest.raises(ConfigError, match="storage has num_host_blocks=1, fewer than the config's 2"):
        KVCacheManager(cfg, SmallHost())  # type: ignore[arg-type]
    assert KVCacheManager(cfg).config is cfg


def test_request_errors_name_the_request_and_the_numbers():
    m = manager(device=2)
    r = req(1, 4, max_new=2)
    assert m.prepare_context(r)
    with pytest.raises(DuplicateRequestError, match="request id 1 already has a KV cache"):
        m.prepare_context(req(1, 4))
    with pytest.raises(InvalidRequestError, match="request 1: resize_context by -1 < 0"):
        m.resize_context(r, -1)
    assert m.resize_context(r, 4)
    with pytest.raises(InvalidRequestError, match=r"request 1: cannot advance by 5 \(history 0, capacity 4"):
        m.advance(r, 5)
    with pytest.raises(
        RequestTooLargeError, match="request 2: up to 9 tokens of KV need 3 blocks, more than the 2"
    ):
        m.prepare_context(req(2, 6, max_new=4))
    m.advance(r, 4)
    r.draft_tokens = [1] * 8
    with pytest.raises(RequestTooLargeError, match="request 1: 13 tokens need 4 blocks, more than the 2"):
        m.try_allocate_generation(r)
    with pytest.raises(UnknownRequestError, match="request 9 has no KV cache"):
        m.block_table(req(9, 4))


def test_a_suspended_request_has_no_block_table():
    m = manager(device=4, host=4)
    r = req(1, 5, max_new=2)
    run_context(m, r)
    m.suspend_request(r)
    with pytest.raises(InvalidRequestError, match="request 1 is suspended: it has no device blocks"):
        m.block_table(r)


def test_blocks_of_generated_tokens_chain_from_the_reused_prefix_and_are_announced():
    m = manager(device=16, host=0, reuse=True)
    prompt = list(range(8)) + [99]
    k1, k2 = keys_of(prompt, 2)
    a = req(1, prompt, max_new=1)
    run_context(m, a)
    m.free_request(a)
    m.drain_events()
    b = req(2, prompt, max_new=8)
    run_context(m, b)  # reuses both blocks; the lookup covered everything it had
    assert b.num_reused_tokens == 8
    for t in (40, 41, 42):
        assert decode(m, b, token=t)  # tokens 9..11 written: block 3 is full
    tokens = b.prompt_token_ids + b.output_token_ids
    k3 = keys_of(tokens, 3)[2]
    assert m.drain_events() == [KVEvent("stored", k3, Tier.DEVICE, k2)]
    m.free_request(b)
    c = req(3, tokens[:12] + [1], max_new=1)
    assert m.prepare_context(c) and c.num_reused_tokens == 12


def test_requests_the_manager_cannot_serve_are_refused_by_name():
    m = manager()

    class Beam:
        request_id = 9
        beam_width = 2
        num_context_tokens = 4

    class Empty:
        request_id = 8
        beam_width = 1
        num_context_tokens = 0

    from kvsched.core.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError, match=r"^request 9: beam width 2 > 1 is not supported$"):
        m.prepare_context(Beam())
    with pytest.raises(InvalidRequestError, match=r"^request 8: empty context$"):
        m.prepare_context(Empty())
    assert not m.has_request(9) and not m.has_request(8)


# -- can_suspend -------------------------------------------------------------------------------------
def test_can_suspend_counts_the_unshared_blocks_against_the_host_room():
    m = manager(device=8, host=2, reuse=True)
    shared = list(range(8))
    a = req(1, shared + [50, 51, 52, 53, 54], max_new=2)  # 4 blocks: 2 shared with b, 2 its own
    run_context(m, a)
    b = req(2, shared + [60], max_new=2)
    run_context(m, b)
    assert m.can_suspend(a)  # 2 unshared blocks, 2 host slots: exactly enough
    c = req(3, 4, max_new=2)
    run_context(m, c)
    m.suspend_request(c)  # 1 host slot left
    assert not m.can_suspend(a)
    assert not m.can_suspend(c)  # suspended already
    assert not m.can_suspend(req(9, 4))  # unknown
    m.suspend_request(b)  # b's shared blocks stay locked by a; its own block takes the last slot
    check_invariants(m)


def test_a_fresh_cache_can_always_be_let_go():
    m = manager(device=8, host=0)
    r = req(1, 8, max_new=2)
    assert m.prepare_context(r)
    assert m.can_suspend(r)  # nothing computed yet: suspending it only lets go of it
    run_context(m, s := req(2, 8, max_new=2))
    assert not m.can_suspend(s)  # no host tier
