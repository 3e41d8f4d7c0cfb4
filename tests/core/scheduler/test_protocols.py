"""The seams' providers and the test fakes satisfy the protocols of ``kvsched.core.protocols``.

mypy checks this file too (``[tool.mypy] files`` in pyproject.toml): each annotated assignment below
fails type checking when a signature drifts from its protocol. At run time the same objects pass the
``isinstance`` checks, and the schedulers refuse an object that lacks a member with a ConfigError.
"""

from __future__ import annotations

import pytest
from sched_fakes import FakeKV, FakePeft, ctx

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager, KVStorage, MetadataStorage
from kvsched.core.peft import PeftCache
from kvsched.core.protocols import (
    PeftPages,
    Scheduler,
    SchedulingKV,
    StepKV,
    TieredKVStorage,
    missing_members,
)
from kvsched.core.scheduler import (
    RecomputeScheduler,
    TwoStageScheduler,
    UnifiedScheduler,
    make_scheduler,
)
from kvsched.core.step import apply_step
from kvsched.sim.storage import CountingStorage


def _manager() -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_device_blocks=8))


def test_the_kv_manager_is_both_kv_seams() -> None:
    m = _manager()
    sched_view: SchedulingKV = m
    step_view: StepKV = m
    assert isinstance(sched_view, SchedulingKV) and isinstance(step_view, StepKV)
    assert missing_members(m, SchedulingKV) == []


def test_the_fakes_are_the_seams_they_stand_in_for() -> None:
    kv = FakeKV()
    sched_view: SchedulingKV = kv
    step_view: StepKV = kv
    peft: PeftPages = FakePeft(max_device_pages=2)
    assert isinstance(sched_view, SchedulingKV) and isinstance(step_view, StepKV)
    assert isinstance(peft, PeftPages)


def test_the_peft_cache_is_the_page_seam() -> None:
    peft: PeftPages = PeftCache(4, 2)
    assert isinstance(peft, PeftPages)
    assert missing_members(peft, PeftPages) == []


def test_metadata_backends_are_kv_storage_without_fixed_pools() -> None:
    backends: list[KVStorage] = [MetadataStorage(8), CountingStorage(8)]
    for backend in backends:
        assert isinstance(backend, KVStorage)
        # No pools of their own: the manager has nothing to check their size against.
        assert not isinstance(backend, TieredKVStorage)


def test_every_scheduler_is_a_scheduler() -> None:
    kv = FakeKV()
    built: list[Scheduler] = [
        UnifiedScheduler(kv, max_batch_size=2),
        TwoStageScheduler(kv, max_batch_size=2),
        RecomputeScheduler(kv, max_batch_size=2),
    ]
    built += [make_scheduler(kind, kv, max_batch_size=2) for kind in ("unified", "two-stage", "recompute")]
    for sched in built:
        assert isinstance(sched, Scheduler)


def test_a_step_through_the_protocols_runs_on_the_real_manager() -> None:
    m = _manager()
    sched: Scheduler = make_scheduler("unified", m, max_batch_size=2)
    r = ctx(0, prompt=5, max_new=1)
    out = sched.schedule([r])
    assert out.context_requests == [r]
    assert apply_step(out, {0: [9]}, m) == [r]
    assert r.output_token_ids == [9] and not m.has_request(0)


class _NoRevert:
    """A KV manager that forgot ``capacity``/``revert`` (drop_scheduled could not undo a step)."""

    tokens_per_block = 4
    num_free_device_blocks = 8

    def prepare_context(self, req: object) -> bool:
        return True

    def resize_context(self, req: object, num_tokens: int) -> bool:
        return True

    def try_allocate_generation(self, req: object) -> bool:
        return True

    def suspend_request(self, req: object) -> None:
        pass

    def free_request(self, req: object) -> None:
        pass

    def is_request_active(self, request_id: int) -> bool:
        return True

    def can_suspend(self, req: object) -> bool:
        return True


class _PagesOnly:
    """A PEFT cache without acquire/release: the scheduler could not pin or unpin an adapter."""

    max_device_pages = 4

    def num_pages(self, req: object) -> int:
        return 1


def test_an_incomplete_kv_manager_is_refused_by_name() -> None:
    kv = _NoRevert()
    assert not isinstance(kv, SchedulingKV)
    assert missing_members(kv, SchedulingKV) == ["capacity", "revert"]
    for kind in ("unified", "two-stage", "recompute"):
        with pytest.raises(
            ConfigError, match="kv_cache_manager must provide SchedulingKV: _NoRevert lacks capacity, revert"
        ):
            make_scheduler(kind, kv, max_batch_size=2)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="draft_kv_cache_manager must provide SchedulingKV: _NoRevert"):
            make_scheduler(kind, FakeKV(), max_batch_size=2, draft_kv_cache_manager=kv)


def test_a_peft_cache_without_acquire_and_release_is_refused() -> None:
    peft = _PagesOnly()
    assert not isinstance(peft, PeftPages)
    for kind in ("unified", "two-stage", "recompute"):
        with pytest.raises(
            ConfigError, match="peft_cache must provide PeftPages: _PagesOnly lacks acquire, release"
        ):
            make_scheduler(kind, FakeKV(), max_batch_size=2, peft_cache=peft)
