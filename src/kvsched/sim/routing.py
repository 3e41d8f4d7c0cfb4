"""The simulator's side of routing: the core's routers (``kvsched.core.routing``) over `Replica`s.

The same `Router` objects the Ray front-end uses pick a replica per arrival. What the simulator adds:
each replica's load as a `ReplicaLoad`, a session per conversation (its first turn's request id), and,
for routers that want them (kv_aware), the replicas' KV events drained after every step. Other routers
keep the fast path: no events built, no prompt tokens materialised at routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvsched.core.request import RequestState
from kvsched.core.routing import ReplicaLoad, Router, make_router, normalize_router_kind
from kvsched.sim.replica import Replica
from kvsched.sim.workload import RequestSpec

_CONTEXT = RequestState.CONTEXT_INIT


class SimRouter:
    """Routes `RequestSpec`s to replicas with a core router of ``kind`` (``kv-aware`` spelling too)."""

    __slots__ = ("kind", "router", "wants_events", "replicas", "_loads", "_root", "_sessions")

    def __init__(self, kind: str, tokens_per_block: int, options: dict[str, Any] | None = None) -> None:
        self.kind = normalize_router_kind(kind)
        self.router: Router = make_router(self.kind, block_size=tokens_per_block, **(options or {}))
        self.wants_events = self.router.wants_events
        self.replicas: Sequence[Replica] = ()
        self._loads: dict[int, ReplicaLoad] = {}
        self._root: dict[int, int] = {}  # request id -> its conversation's first request id
        self._sessions = self.router.wants_sessions  # only then is each turn's conversation looked up

    def attach(self, replicas: Sequence[Replica]) -> None:
        """Route over ``replicas``; an event-fed router receives each one's KV events after its steps."""
        self.replicas = replicas
        self._loads = {r.index: ReplicaLoad() for r in replicas}  # kept and refreshed, not rebuilt
        if self.wants_events:
            for r in replicas:
                r.on_events = self.router.on_events

    def route(self, spec: RequestSpec) -> Replica:
        reps = self.replicas
        if len(reps) == 1:
            return reps[0]
        session = None
        if self._sessions:
            parent = spec.parent
            session = spec.request_id if parent is None else self._root.get(parent, parent)
            self._root[spec.request_id] = session
        loads = self._loads
        if self.wants_events:
            for r in reps:
                ld = loads[r.index]
                waiting = sum(1 for q in r.active if q.state == _CONTEXT)
                ld.num_waiting = waiting
                ld.num_running = len(r.active) - waiting
                kv = r.kv
                ld.kv_usage = 1.0 - kv.num_free_device_blocks / kv.num_device_blocks
            tokens: Any = spec.prompt_tokens()
        else:
            for r in reps:
                loads[r.index].num_running = len(r.active)
            tokens = ()
        pick = self.router.choose(tokens, loads, session=session, lora_id=spec.lora_id)
        return reps[pick]
