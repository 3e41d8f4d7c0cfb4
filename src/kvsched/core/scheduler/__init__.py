"""Schedulers: the unified single-pass scheduler (the seed) and the baselines behind one interface."""

from __future__ import annotations

from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.scheduler.policy import CapacityPolicy
from kvsched.core.scheduler.unified import UnifiedScheduler

__all__ = ["CapacityPolicy", "SchedulerOutput", "UnifiedScheduler", "make_scheduler"]

SCHEDULER_KINDS = ("unified",)


def make_scheduler(kind: str, kv_cache_manager: Any, **kwargs: Any) -> Any:
    """Build a scheduler by name: ``"unified"`` | ``"two-stage"`` | ``"recompute"``."""
    if kind == "unified":
        kwargs.pop("policy", None)
        return UnifiedScheduler(kv_cache_manager, **kwargs)
    raise ConfigError(f"scheduler={kind!r} is invalid: must be one of {', '.join(SCHEDULER_KINDS)}")
