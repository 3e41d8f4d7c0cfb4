"""Schedulers: the unified single-pass scheduler (the seed) and the baselines behind one interface."""

from __future__ import annotations

from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.scheduler.policy import CapacityPolicy
from kvsched.core.scheduler.recompute import RecomputeScheduler
from kvsched.core.scheduler.two_stage import TwoStageScheduler
from kvsched.core.scheduler.unified import UnifiedScheduler

__all__ = [
    "CapacityPolicy",
    "RecomputeScheduler",
    "SchedulerOutput",
    "TwoStageScheduler",
    "UnifiedScheduler",
    "make_scheduler",
]

SCHEDULER_KINDS = ("unified", "two-stage", "recompute")


def make_scheduler(kind: str, kv_cache_manager: Any, **kwargs: Any) -> Any:
    """Build a scheduler by name: ``"unified"`` | ``"two-stage"`` | ``"recompute"``.

    ``policy`` (a :class:`CapacityPolicy` or its lowercase name) matters to two-stage only; the other
    two accept and ignore it, so one set of keywords fits every kind.
    """
    if kind == "unified":
        kwargs.pop("policy", None)  # the seed, too, ignores the capacity policy
        return UnifiedScheduler(kv_cache_manager, **kwargs)
    if kind == "two-stage":
        if kwargs.get("policy") is None:
            kwargs.pop("policy", None)  # default: MAX_UTILIZATION
        return TwoStageScheduler(kv_cache_manager, **kwargs)
    if kind == "recompute":
        kwargs.pop("policy", None)
        return RecomputeScheduler(kv_cache_manager, **kwargs)
    raise ConfigError(f"scheduler={kind!r} is invalid: must be one of {', '.join(SCHEDULER_KINDS)}")
