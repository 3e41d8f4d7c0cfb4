"""What the front-end knows of each replica and each routed request, and the views /health and
/metrics take of it (``ReplicatedBackend`` owns the state; the engine thread alone changes it)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsched.core.routing import ReplicaLoad
from kvsched.engine.outputs import StepOutput
from kvsched.serve.metrics import EngineSnapshot, ReplicaSnapshot


@dataclass(slots=True)
class Route:
    """Where a request runs, and what a retry on another replica needs (dropped at its first token)."""

    replica: int
    add_args: tuple | None
    retried: bool = False


@dataclass(slots=True)
class ReplicaState:
    """One replica as the front-end sees it: its actor, liveness, last reported load and engine state."""

    actor: Any
    alive: bool = True
    error: str | None = None
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    snapshot: EngineSnapshot = field(default_factory=EngineSnapshot)
    num_requests: int = 0  # routed here and not finished (front-end count)
    routed: int = 0  # requests routed here since start (retries included)
    busy: bool = False  # its engine still had unfinished requests at its last reply


def health_entries(replicas: Sequence[ReplicaState]) -> list[dict[str, Any]]:
    """Each replica: alive or dead (and why), running and waiting requests (its last reply)."""
    return [
        {
            "replica": i,
            "alive": r.alive,
            "num_running": r.load.num_running if r.alive else 0,
            "num_waiting": r.load.num_waiting if r.alive else 0,
            **({} if r.error is None else {"error": r.error}),
        }
        for i, r in enumerate(replicas)
    ]


def totals(replicas: Sequence[ReplicaState]) -> EngineSnapshot:
    """Totals over the replicas (gauges over the live ones; counters over all, so they never go back
    when one dies) and each replica's own figures."""
    total = EngineSnapshot()
    per: list[ReplicaSnapshot] = []
    n = max(1, sum(r.alive for r in replicas))  # the usages are the mean over the live replicas
    for i, r in enumerate(replicas):
        s = r.snapshot
        if r.alive:
            total.num_running += s.num_running
            total.num_waiting += s.num_waiting
            total.num_paused += s.num_paused
            total.device_kv_usage += s.device_kv_usage / n
            total.host_kv_usage += s.host_kv_usage / n
        total.prefix_queries += s.prefix_queries
        total.prefix_hits += s.prefix_hits
        total.num_suspends += s.num_suspends
        total.num_resumes += s.num_resumes
        total.num_preemptions += s.num_preemptions
        per.append(ReplicaSnapshot(replica=i, alive=r.alive, routed=r.routed, engine=s))
    total.replicas = tuple(per)
    return total


def error_output(request_id: Hashable, message: str) -> StepOutput:
    """The last output of a request the front-end fails (finish_reason "error", ``message`` says why)."""
    return StepOutput(request_id, [], "", finished=True, finish_reason="error", error=message)
