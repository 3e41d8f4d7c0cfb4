"""Sessions in the simulator's routing: SimRouter asks the router (``Router.wants_sessions``), not the
router's kind name, whether to work out each turn's conversation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvsched.core.routing import ROUTER_KINDS, Router, make_router
from kvsched.core.routing.routers import StickyRouter
from kvsched.sim import routing as sim_routing
from kvsched.sim.routing import SimRouter
from kvsched.sim.workload import RequestSpec


def test_the_routers_that_read_sessions_say_so():
    wants = {kind: make_router(kind, block_size=16).wants_sessions for kind in ROUTER_KINDS}
    assert wants == {"round_robin": False, "least_loaded": False, "sticky": True, "kv_aware": True}
    assert all(isinstance(make_router(kind, block_size=16), Router) for kind in ROUTER_KINDS)


class _Recording:
    """A router of any kind that records the session of each choice and picks replica 1."""

    wants_events = False

    def __init__(self, wants_sessions: bool) -> None:
        self.wants_sessions = wants_sessions
        self.sessions: list[object] = []

    def choose(self, token_ids, loads, *, session=None, salt=None, lora_id=None) -> int:  # noqa: ANN001
        self.sessions.append(session)
        return 1

    def on_events(self, replica, events) -> None:  # noqa: ANN001
        return None

    def remove_replica(self, replica) -> None:  # noqa: ANN001
        return None


def _turns() -> list[RequestSpec]:
    """A conversation of three turns (each the next one's parent), then a new conversation."""
    seg = ((0, 8),)
    return [
        RequestSpec(10, 0.0, seg, 2),
        RequestSpec(11, 0.5, seg, 2, parent=10),
        RequestSpec(12, 0.5, seg, 2, parent=11),
        RequestSpec(20, 1.0, seg, 2),
    ]


@pytest.mark.parametrize(
    ("kind", "wants", "expected"),
    [
        ("round_robin", True, [10, 10, 10, 20]),  # a cache-blind kind whose router reads sessions
        ("sticky", False, [None, None, None, None]),  # a session kind whose router does not
    ],
)
def test_sim_router_passes_sessions_as_its_router_asks(monkeypatch, kind, wants, expected):
    router = _Recording(wants)
    monkeypatch.setattr(sim_routing, "make_router", lambda *a, **kw: router)
    sim = SimRouter(kind, 16)
    reps = [SimpleNamespace(index=i, active=[]) for i in range(2)]
    sim.attach(reps)  # type: ignore[arg-type]
    assert [sim.route(spec).index for spec in _turns()] == [1, 1, 1, 1]
    assert router.sessions == expected


def test_the_real_sticky_router_keeps_a_conversation_on_one_replica():
    sim = SimRouter("sticky", 16)
    assert isinstance(sim.router, StickyRouter)
    reps = [SimpleNamespace(index=i, active=[]) for i in range(3)]
    sim.attach(reps)  # type: ignore[arg-type]
    picks = []
    for spec in _turns():
        rep = sim.route(spec)
        picks.append(rep.index)
        rep.active.append(spec)  # its load now counts: a cache-blind pick would move on
    assert picks[0] == picks[1] == picks[2] != picks[3]
