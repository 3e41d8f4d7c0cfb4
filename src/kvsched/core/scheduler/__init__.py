"""Schedulers: the unified single-pass scheduler (TensorRT-LLM PR #11939's KVCacheV2Scheduler) and the
baselines behind one interface."""

from __future__ import annotations

from typing import Any

from kvsched.core.config import SCHEDULER_KINDS, CapacityPolicy, validate_scheduler_options
from kvsched.core.protocols import Scheduler, SchedulingKV
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.scheduler.recompute import RecomputeScheduler
from kvsched.core.scheduler.two_stage import TwoStageScheduler
from kvsched.core.scheduler.unified import UnifiedScheduler

__all__ = [
    "CapacityPolicy",
    "RecomputeScheduler",
    "SCHEDULER_KINDS",
    "SchedulerOutput",
    "TwoStageScheduler",
    "UnifiedScheduler",
    "make_scheduler",
]


def make_scheduler(kind: str, kv_cache_manager: SchedulingKV, **kwargs: Any) -> Scheduler:
    """Build a scheduler by name, one of :data:`SCHEDULER_KINDS`.

    The keywords are the constructors' (budgets, ``peft_cache``, ``draft_kv_cache_manager``,
    ``priority_mode``) plus ``policy``: a :class:`CapacityPolicy` or its lowercase name, taken by
    two-stage only (None = MAX_UTILIZATION). Everything is checked by
    :func:`~kvsched.core.config.validate_scheduler_options` first, so a policy given to a scheduler
    that has no capacity stage is a ConfigError rather than silently ignored.
    """
    policy = validate_scheduler_options(
        kind,
        max_batch_size=kwargs.get("max_batch_size"),  # type: ignore[arg-type]
        max_num_tokens=kwargs.get("max_num_tokens"),
        chunk_unit_size=kwargs.get("chunk_unit_size"),
        capacity_policy=kwargs.pop("policy", None),
    )
    if kind == "two-stage":
        return TwoStageScheduler(kv_cache_manager, policy=policy, **kwargs)
    if kind == "recompute":
        return RecomputeScheduler(kv_cache_manager, **kwargs)
    return UnifiedScheduler(kv_cache_manager, **kwargs)
