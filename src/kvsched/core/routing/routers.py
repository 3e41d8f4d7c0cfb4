"""The router protocol and the cache-blind routers: round-robin, least-loaded, sticky sessions.

Every router takes the loads of the LIVE replicas on each call (a replica that died is simply absent),
so none of them keeps a replica list that could go stale.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import KVEvent
from kvsched.core.routing.load import ReplicaLoad, check_loads, least_loaded


@runtime_checkable
class Router(Protocol):
    """Picks a replica per request. ``wants_events``: feed it the replicas' KV events (``on_events``);
    callers skip building tokens and draining events for routers that do not. ``wants_sessions``: it
    reads ``choose``'s ``session`` (a conversation's turns); callers that must work out a request's
    session (the simulator walks each turn back to its conversation) skip that for routers that do not."""

    wants_events: bool
    wants_sessions: bool

    def choose(
        self,
        token_ids: Sequence[int],
        loads: Mapping[int, ReplicaLoad],
        *,
        session: Hashable | None = None,
        salt: int | None = None,
        lora_id: int | None = None,
    ) -> int: ...

    def on_events(self, replica: int, events: Iterable[KVEvent]) -> None: ...

    def remove_replica(self, replica: int) -> None: ...


class _CacheBlind:
    """Shared no-ops of routers that ignore the KV cache."""

    wants_events = False
    wants_sessions = False

    def on_events(self, replica: int, events: Iterable[KVEvent]) -> None:
        return None

    def remove_replica(self, replica: int) -> None:
        return None


class RoundRobinRouter(_CacheBlind):
    """Cycles over the live replicas in id order: after replica ``r``, the next live id above it."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = -1

    def choose(
        self,
        token_ids: Sequence[int],
        loads: Mapping[int, ReplicaLoad],
        *,
        session: Hashable | None = None,
        salt: int | None = None,
        lora_id: int | None = None,
    ) -> int:
        check_loads(loads)
        last = self._last
        above = [r for r in loads if r > last]
        pick = min(above) if above else min(loads)
        self._last = pick
        return pick


class LeastLoadedRouter(_CacheBlind):
    """Fewest requests (running + waiting); ties to the lowest id."""

    __slots__ = ()

    def choose(
        self,
        token_ids: Sequence[int],
        loads: Mapping[int, ReplicaLoad],
        *,
        session: Hashable | None = None,
        salt: int | None = None,
        lora_id: int | None = None,
    ) -> int:
        return least_loaded(loads)  # raises on no live replica


class SessionTable:
    """session -> replica, bounded (least recently used dropped first) so a long-lived server's table
    cannot grow without limit."""

    __slots__ = ("_map", "max_sessions")

    def __init__(self, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions={max_sessions!r} is invalid: must be >= 1")
        self._map: OrderedDict[Hashable, int] = OrderedDict()
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return len(self._map)

    def get(self, session: Hashable) -> int | None:
        rid = self._map.get(session)
        if rid is not None:
            self._map.move_to_end(session)
        return rid

    def put(self, session: Hashable, replica: int) -> None:
        self._map[session] = replica
        self._map.move_to_end(session)
        if len(self._map) > self.max_sessions:
            self._map.popitem(last=False)

    def drop_replica(self, replica: int) -> None:
        for s in [s for s, r in self._map.items() if r == replica]:
            del self._map[s]


class StickyRouter(_CacheBlind):
    """A session's later requests go where its first went (its prefix is cached there); a first
    request, or one whose replica is gone, goes least-loaded."""

    wants_sessions = True

    __slots__ = ("sessions",)

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.sessions = SessionTable(max_sessions)

    def choose(
        self,
        token_ids: Sequence[int],
        loads: Mapping[int, ReplicaLoad],
        *,
        session: Hashable | None = None,
        salt: int | None = None,
        lora_id: int | None = None,
    ) -> int:
        if session is None:  # no live replica: least_loaded raises (a session's replica is then absent too)
            return least_loaded(loads)
        rid = self.sessions.get(session)
        if rid is None or rid not in loads:
            rid = least_loaded(loads)
            self.sessions.put(session, rid)
        return rid

    def remove_replica(self, replica: int) -> None:
        self.sessions.drop_replica(replica)
