"""A failed host<->device copy leaves the manager as it was before the call: the error names the request
and the copy, nothing leaks, and the same call succeeds once copies work again."""

from __future__ import annotations

import pytest

from kvc_helpers import make, req, run_context
from kvsched.core.errors import KVTransferError
from kvsched.core.kvcache.invariants import check_invariants


class FlakyStorage:
    """Metadata-only storage whose copies fail while ``broken`` is set."""

    bytes_per_block = 10

    def __init__(self) -> None:
        self.broken = False
        self.copies = 0

    def copy_blocks(self, src_tier, src, dst_tier, dst) -> None:
        if self.broken:
            raise RuntimeError("boom")
        self.copies += 1


def test_a_failed_suspend_leaves_the_request_active_with_its_blocks():
    st = FlakyStorage()
    m = make(tpb=4, device=4, host=4, storage=st)
    r = req(1, 8, max_new=2)
    run_context(m, r)
    table = m.block_table(r)
    st.broken = True
    with pytest.raises(
        KVTransferError, match="^copying 2 KV blocks DEVICE -> HOST failed: RuntimeError: boom$"
    ) as err:
        m.suspend_request(r)
    assert err.value.request_id == 1
    assert m.is_request_active(1) and m.block_table(r) == table
    s = m.stats()
    assert (s.used_device_blocks, s.used_host_blocks, s.num_suspends) == (2, 0, 0)
    assert m.device_usage() == 0.5
    check_invariants(m)
    st.broken = False
    m.suspend_request(r)
    assert not m.is_request_active(1)
    check_invariants(m)


def test_a_failed_resume_leaves_the_request_suspended_and_resumable():
    st = FlakyStorage()
    m = make(tpb=4, device=4, host=4, storage=st)
    r = req(1, 8, max_new=2)
    run_context(m, r)
    m.suspend_request(r)
    st.broken = True
    with pytest.raises(KVTransferError, match="HOST -> DEVICE") as err:
        m.try_allocate_generation(r)
    assert err.value.request_id == 1
    s = m.stats()
    assert not m.is_request_active(1) and (s.used_host_blocks, s.free_device_blocks, s.num_resumes) == (
        2,
        4,
        0,
    )
    check_invariants(m)
    st.broken = False
    assert m.try_allocate_generation(r) and m.is_request_active(1)
    check_invariants(m)


def test_a_failed_offload_of_evicted_blocks_drops_them_and_still_makes_room():
    st = FlakyStorage()
    m = make(tpb=4, device=4, host=4, storage=st, reuse=True)
    a = req(1, list(range(8)) + [99], max_new=1)
    run_context(m, a)
    m.free_request(a)  # 2 cached device blocks
    st.broken = True
    w = req(2, 16, max_new=1)
    run_context(m, w)  # needs every device block: the cached ones cannot go to the host, so they go
    s = m.stats()
    assert (s.dropped_device_blocks, s.offload_blocks, s.cached_host_blocks, s.free_host_blocks) == (
        2,
        0,
        0,
        4,
    )
    check_invariants(m)


def test_a_failed_move_of_parked_blocks_refuses_the_allocation_without_raising():
    st = FlakyStorage()
    m = make(tpb=4, device=4, host=2, storage=st)
    a, b = req(1, 8, max_new=1), req(2, 8, max_new=1)
    run_context(m, a)
    m.suspend_request(a)  # host full
    run_context(m, b)
    m.suspend_request(b)  # parked on the device
    assert m.try_allocate_generation(a)
    m.free_request(a)  # one of b's blocks moved down to make room for a; one is still parked
    before = m.stats()
    assert (before.used_host_blocks, before.used_device_blocks) == (1, 1)
    st.broken = True
    c = req(3, 16, max_new=1)
    assert m.prepare_context(c) and not m.resize_context(c, 16)  # needs the parked block's slot
    s = m.stats()
    assert (s.used_host_blocks, s.used_device_blocks, s.free_host_blocks) == (1, 1, 1)  # nothing moved
    check_invariants(m)
    st.broken = False
    assert m.try_allocate_generation(b)  # b comes back from where it stayed
    check_invariants(m)


def test_a_failed_suspend_restores_blocks_shared_with_another_active_request():
    st = FlakyStorage()
    m = make(tpb=4, device=8, host=4, storage=st, reuse=True)
    shared = list(range(8))
    a = req(1, shared + [50, 51, 52, 53, 54], max_new=2)
    run_context(m, a)
    b = req(2, shared + [60], max_new=2)
    run_context(m, b)  # shares a's first two blocks
    st.broken = True
    with pytest.raises(KVTransferError):
        m.suspend_request(a)
    check_invariants(m)  # every block's lock count matches its users again
    m.free_request(b)
    check_invariants(m)
    st.broken = False
    m.suspend_request(a)  # the shared blocks are a's alone now: all of a moves
    assert m.stats().used_host_blocks == 4
    check_invariants(m)


class RaisingStorage:
    """Metadata-only storage whose copies raise ``error`` (an instance) while it is set."""

    bytes_per_block = 10

    def __init__(self) -> None:
        self.error: Exception | None = None

    def copy_blocks(self, src_tier, src, dst_tier, dst) -> None:
        if self.error is not None:
            raise self.error


def _two_cached_device_blocks(st: RaisingStorage):
    m = make(tpb=4, device=4, host=4, storage=st, reuse=True)
    a = req(1, list(range(8)) + [99], max_new=1)
    run_context(m, a)
    m.free_request(a)
    return m


@pytest.mark.parametrize("error", [OSError("disk gone"), MemoryError(), RuntimeError("CUDA error")])
def test_an_offload_that_fails_at_run_time_drops_the_cached_blocks(error):
    st = RaisingStorage()
    m = _two_cached_device_blocks(st)
    st.error = error
    run_context(m, req(2, 16, max_new=1))  # every device block: the two cached ones must go
    s = m.stats()
    assert (s.dropped_device_blocks, s.offload_blocks, s.cached_host_blocks) == (2, 0, 0)
    check_invariants(m)


@pytest.mark.parametrize("error", [ValueError("2 sources but 3 destinations"), IndexError("slot 9")])
def test_an_offload_that_fails_on_a_bug_raises_instead_of_dropping(error):
    """A length mismatch or a slot outside the pool is a bug in the caller, not a failed copy: it
    propagates (before, every exception was swallowed and the blocks silently dropped)."""
    st = RaisingStorage()
    m = _two_cached_device_blocks(st)
    st.error = error
    with pytest.raises(type(error), match=str(error.args[0])):
        run_context(m, req(2, 16, max_new=1))
    s = m.stats()
    assert s.dropped_device_blocks == 0
    assert (s.cached_device_blocks, s.used_host_blocks, s.offload_blocks) == (2, 0, 0)
    check_invariants(m)


@pytest.mark.parametrize("error", [ValueError("2 sources but 3 destinations"), IndexError("slot 9")])
def test_a_suspend_whose_copy_fails_on_a_bug_raises_it_as_itself_and_moves_nothing(error):
    """Not wrapped in ``KVTransferError`` (which callers treat as a failed copy and contain): the
    bug surfaces, and the host slots taken for the copy are returned."""
    st = RaisingStorage()
    m = make(tpb=4, device=4, host=4, storage=st)
    r = req(1, 8, max_new=2)
    run_context(m, r)
    st.error = error
    with pytest.raises(type(error), match=str(error.args[0])):
        m.suspend_request(r)
    s = m.stats()
    assert m.is_request_active(1) and (s.used_host_blocks, s.free_host_blocks) == (0, 4)
    check_invariants(m)
