"""What a router knows about a replica's load, and the least-loaded choice every router falls back to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvsched.core.errors import ConfigError


@dataclass(slots=True)
class ReplicaLoad:
    """A live replica's load as its engine reports it.

    ``num_running``: requests scheduled on it (prefill started or decoding); ``num_waiting``: requests
    queued that have not started; ``kv_usage``: the used fraction of its device KV pool, in [0, 1].
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0

    @property
    def queue(self) -> int:
        """Requests in the replica (running + waiting): the least-loaded key."""
        return self.num_running + self.num_waiting


def check_loads(loads: Mapping[int, ReplicaLoad]) -> None:
    """An empty mapping means no live replica: a clear error rather than an arbitrary pick."""
    if not loads:
        raise ConfigError("no live replica to route to: loads is empty")


def least_loaded(loads: Mapping[int, ReplicaLoad]) -> int:
    """The replica with the fewest requests; ties go to the lowest replica id (deterministic).
    No replica at all is ``check_loads``'s error, not a sentinel id."""
    best = -1
    best_q = 0
    for rid, load in loads.items():
        q = load.num_running + load.num_waiting
        if best < 0 or q < best_q or (q == best_q and rid < best):
            best, best_q = rid, q
    if best < 0:
        check_loads(loads)
    return best
