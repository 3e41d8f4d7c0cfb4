"""kvsched: a KV-cache-centric LLM serving core.

``import kvsched`` never imports torch: every public name is resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "CacheConfig": "kvsched.core.config",
    "SchedulerConfig": "kvsched.core.config",
    "Request": "kvsched.core.request",
    "RequestState": "kvsched.core.request",
    "SamplingParams": "kvsched.core.request",
    "KVCacheManager": "kvsched.core.kvcache",
    "UnifiedScheduler": "kvsched.core.scheduler",
    "TwoStageScheduler": "kvsched.core.scheduler",
    "RecomputeScheduler": "kvsched.core.scheduler",
    "CapacityPolicy": "kvsched.core.scheduler",
    "SchedulerOutput": "kvsched.core.scheduler",
    "LLM": "kvsched.engine.llm",
    "RequestOutput": "kvsched.engine.llm",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
