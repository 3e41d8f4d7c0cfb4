"""Routing requests over engine replicas (torch-free, shared by the Ray front-end and the simulator).

``make_router(kind, block_size=...)`` builds one of ``ROUTER_KINDS``; see ``kv_aware.py`` for the
KV-aware cost and ``index.py`` for the prefix index fed by the replicas' KV events.
"""

from __future__ import annotations

from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.core.routing.index import PrefixIndex, prompt_keys
from kvsched.core.routing.kv_aware import KVAwareRouter
from kvsched.core.routing.load import ReplicaLoad, least_loaded
from kvsched.core.routing.routers import LeastLoadedRouter, RoundRobinRouter, Router, StickyRouter

__all__ = [
    "ROUTER_KINDS",
    "KVAwareRouter",
    "LeastLoadedRouter",
    "PrefixIndex",
    "ReplicaLoad",
    "RoundRobinRouter",
    "Router",
    "StickyRouter",
    "least_loaded",
    "make_router",
    "normalize_router_kind",
    "prompt_keys",
]

ROUTER_KINDS = ("round_robin", "least_loaded", "sticky", "kv_aware")


def normalize_router_kind(kind: str) -> str:
    """CLI spellings (``kv-aware``, ``Round-Robin``) to a ``ROUTER_KINDS`` name; a clear error otherwise."""
    if not isinstance(kind, str):
        raise ConfigError(f"router kind must be a string, got {type(kind).__name__}")
    name = kind.strip().lower().replace("-", "_")
    if name not in ROUTER_KINDS:
        raise ConfigError(f"router={kind!r} is unknown: one of {', '.join(ROUTER_KINDS)}")
    return name


def make_router(kind: str, *, block_size: int, **kwargs: Any) -> Router:
    """A router of ``kind``; ``block_size`` must equal the replicas' ``tokens_per_block`` (the KV-aware
    router keys prompts as their managers do). ``kwargs`` go to ``KVAwareRouter`` (weights, thresholds)
    or ``max_sessions`` to the sticky router; others refuse any."""
    name = normalize_router_kind(kind)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"block_size={block_size!r} is invalid: must be an integer >= 1")
    try:
        if name == "kv_aware":
            return KVAwareRouter(block_size, **kwargs)
        if name == "sticky":
            return StickyRouter(**kwargs)
    except TypeError as exc:  # an option the router does not take
        raise ConfigError(f"router {name!r}: {exc}") from exc
    if kwargs:
        raise ConfigError(f"router {name!r} takes no options, got {', '.join(sorted(kwargs))}")
    return RoundRobinRouter() if name == "round_robin" else LeastLoadedRouter()
