"""``ReplicatedBackend``: the server's :class:`~kvsched.serve.backend.Backend` over N engine replicas
that are Ray actors, each with its own KV pools, behind a router from ``kvsched.core.routing``.

The server's engine thread (``serve/async_engine.py``) drives it as it drives one engine: ``add_request``
routes a request (``Router.choose`` over the live replicas' loads, with its token ids, cache salt and
LoRA id) and sends it to that actor without waiting; ``step`` keeps one ``step.remote()`` in flight per
busy replica and returns the outputs of whichever replies are ready (``ray.wait`` with a short timeout),
so replicas never run in lockstep and a slow one holds up nobody. Each reply carries the replica's KV
events (fed to the router's prefix index) and its load.

Failure (Ray's actor fault model: a dead actor's pending calls raise ``RayActorError``): the replica is
taken out of routing (``Router.remove_replica``); its requests that had not sent a token are routed
once more to a live replica, the others end with finish_reason "error" and a message that says so (the
server turns it into an OpenAI-shaped error, in-band on a stream). The other replicas keep serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from kvsched.core.errors import DuplicateRequestError
from kvsched.core.request import SamplingParams
from kvsched.core.routing import ReplicaLoad, Router
from kvsched.engine.outputs import RequestOutput, StepOutput
from kvsched.serve.handle import EngineClosedError
from kvsched.serve.metrics import EngineSnapshot
from kvsched.serve.replicas.frontend import FrontTokenizer, check_request
from kvsched.serve.replicas.replica import ReplicaInfo, StepReply
from kvsched.serve.replicas.state import ReplicaState, Route, error_output, health_entries, totals

#: The actors' concurrency group for pings (one thread beside the engine's): a long step does not delay it.
PROBE_GROUP = "probe"
#: Longest a ``step`` call waits for a reply: short, so the engine thread takes new requests promptly.
DEFAULT_WAIT_S = 0.005


class ReplicatedBackend:
    """A Backend over Ray actor handles of :class:`~kvsched.serve.replicas.replica.EngineReplica`."""

    #: ``add_request(..., session=...)``: the server passes the OpenAI ``user`` field (serve/async_engine.py)
    accepts_sessions = True

    def __init__(
        self,
        actors: Sequence[Any],
        info: ReplicaInfo,
        tokenizer: Any,
        router: Router,
        *,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        import ray  # the caller checked that the extra is installed (kvsched.serve.replicas.require_ray)

        self._ray = ray
        self._actor_error = ray.exceptions.RayActorError
        if not actors:
            raise ValueError("a replicated backend needs at least one replica")
        self.info = info
        self.max_model_len = info.max_model_len
        self.lora_names: tuple[str, ...] = tuple(info.lora_names)
        self._lora_ids = dict(info.lora_ids)
        self._front = FrontTokenizer(tokenizer)
        self.router = router
        self.wait_s = wait_s
        self.replicas = [ReplicaState(actor=a) for a in actors]
        self._routes: dict[Hashable, Route] = {}
        self._inflight: dict[Any, int] = {}  # step ObjectRef -> replica
        self._results: dict[Hashable, RequestOutput] = {}
        self._pending: list[StepOutput] = []  # outputs made here (failures), returned by the next step
        self.num_retried = 0

    # -- tokenizing (worker threads) ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._front.encode(text)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self._front.encode_chat(messages)

    def token_text(self, token_id: int) -> str:
        return self._front.token_text(token_id)

    # -- requests (engine thread) ------------------------------------------------------------------
    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: Hashable,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: int | None = None,
        lora: str | None = None,
        session: Hashable | None = None,
    ) -> None:
        """Check the request as the engine would, route it and send it (without waiting for the actor).
        ``session``: requests of one conversation (the OpenAI ``user`` field) for sticky routing."""
        if request_id in self._routes:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use")
        check_request(self.info, token_ids, params, priority, cache_salt, lora)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        args = (token_ids, params, request_id, priority, arrival, cache_salt, lora, session)
        replica = self._route(args)
        self._routes[request_id] = Route(replica, args)

    def _route(self, args: tuple, exclude: int = -1) -> int:
        token_ids, params, rid, priority, arrival, salt, lora, session = args
        loads = {i: r.load for i, r in enumerate(self.replicas) if r.alive and i != exclude}
        if not loads:
            raise EngineClosedError("no engine replica is alive")
        lora_id = None if lora is None else self._lora_ids.get(lora)
        i = self.router.choose(token_ids, loads, session=session, salt=salt, lora_id=lora_id)
        rep = self.replicas[i]
        age = time.monotonic() - arrival
        rep.actor.add.remote(token_ids, params, rid, priority, age, salt, lora)
        rep.load.num_waiting += 1  # until its next reply says otherwise: a burst does not pile up
        rep.num_requests += 1
        rep.routed += 1
        return i

    def abort_request(self, request_id: Hashable) -> RequestOutput | None:
        """Abort on its replica (sent, not awaited); the result is not waited for either (None)."""
        route = self._routes.pop(request_id, None)
        if route is None:
            return self._results.pop(request_id, None)
        rep = self.replicas[route.replica]
        rep.num_requests -= 1
        if rep.alive:
            rep.actor.abort.remote(request_id)
        return None

    def release(self, request_id: Hashable) -> RequestOutput | None:
        return self._results.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._routes) or bool(self._pending)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Launch a step on every busy replica without one in flight; return the replies ready within
        ``wait_s`` (and any failures made here)."""
        running = set(self._inflight.values())
        for i, rep in enumerate(self.replicas):
            if rep.alive and i not in running and (rep.num_requests > 0 or rep.busy):
                self._inflight[rep.actor.step.remote()] = i
        outputs, self._pending = self._pending, []
        if not self._inflight:
            return outputs
        refs = list(self._inflight)
        ready, rest = self._ray.wait(refs, num_returns=1, timeout=self.wait_s)
        if ready and rest:
            ready += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            i = self._inflight.pop(ref)
            try:
                reply: StepReply = self._ray.get(ref)
            except self._actor_error as exc:
                self._replica_died(i, exc, outputs)
                continue
            except Exception as exc:  # its step raised, or its reply was lost: is the actor still there?
                if self._is_dead(i):
                    self._replica_died(i, exc, outputs)
                else:  # fail its requests, keep routing to it
                    cause = getattr(exc, "cause", None) or exc  # RayTaskError: the replica's own error
                    message = f"engine replica {i} failed a step: {type(cause).__name__}: {cause}"
                    self._fail_replica_requests(i, message, outputs)
                continue
            self._take(i, reply, outputs)
        return outputs

    def _take(self, i: int, reply: StepReply, outputs: list[StepOutput]) -> None:
        rep = self.replicas[i]
        snap = reply.snapshot
        rep.snapshot = snap
        rep.load = ReplicaLoad(snap.num_running, snap.num_waiting, snap.device_kv_usage)
        rep.busy = reply.num_unfinished > 0
        if reply.events and self.router.wants_events:
            self.router.on_events(i, reply.events)
        for rid, kind, message in reply.rejected:
            if self._routes.pop(rid, None) is not None:
                rep.num_requests -= 1
                outputs.append(error_output(rid, f"the replica refused the request: {kind}: {message}"))
        for out in reply.outputs:
            route = self._routes.get(out.request_id)
            if route is None or route.replica != i:
                continue  # aborted here meanwhile (its abort is on its way), or moved by a retry
            route.add_args = None  # a token was sent: no retry any more
            if out.finished:
                del self._routes[out.request_id]
                rep.num_requests -= 1
                result = reply.results.get(out.request_id)
                if result is not None:
                    self._results[out.request_id] = result
            outputs.append(out)

    def _replica_died(self, i: int, exc: BaseException, outputs: list[StepOutput]) -> None:
        rep = self.replicas[i]
        rep.alive, rep.busy, rep.error = False, False, type(exc).__name__
        rep.load = ReplicaLoad()
        self.router.remove_replica(i)
        for rid, route in list(self._routes.items()):
            if route.replica != i:
                continue
            rep.num_requests -= 1
            if route.add_args is not None and not route.retried and self.num_alive:
                self.num_retried += 1
                route.replica, route.retried = self._route(route.add_args, exclude=i), True
                continue
            del self._routes[rid]
            why = "it had already sent tokens" if route.add_args is None else "its one retry was used"
            if not self.num_alive:
                why = "no other replica is alive"
            outputs.append(
                error_output(
                    rid, f"engine replica {i} died ({rep.error}); the request was not retried: {why}"
                )
            )

    def _is_dead(self, i: int, timeout_s: float = 10.0) -> bool:
        """True if replica ``i``'s actor is gone (a ping raises RayActorError); a slow one is alive."""
        try:
            self._ray.get(self._ping(i), timeout=timeout_s)
        except self._actor_error:
            return True
        except Exception:  # a timeout or a lost reply: not proof of death
            return False
        return False

    def _fail_replica_requests(self, i: int, message: str, outputs: list[StepOutput]) -> None:
        for rid, route in list(self._routes.items()):
            if route.replica == i:
                del self._routes[rid]
                self.replicas[i].num_requests -= 1
                outputs.append(error_output(rid, message))

    # -- state -------------------------------------------------------------------------------------
    @property
    def num_alive(self) -> int:
        return sum(r.alive for r in self.replicas)

    async def health_report(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """:meth:`health`, with each live replica pinged first (event-loop thread): one that died while
        idle shows as dead here at once; routing learns it at its next call (its requests are retried).
        The ping runs in the actor's ``probe`` concurrency group, so a long step does not delay it; a
        ping that times out is not proof of death."""
        report = self.health()
        live = [e for e in report if e["alive"]]
        pings = [
            asyncio.wait_for(asyncio.wrap_future(self._ping(e["replica"]).future()), timeout_s) for e in live
        ]
        for entry, res in zip(live, await asyncio.gather(*pings, return_exceptions=True)):
            if isinstance(res, self._actor_error):
                entry.update(alive=False, num_running=0, num_waiting=0, error=type(res).__name__)
        return report

    def _ping(self, i: int) -> Any:
        return self.replicas[i].actor.ping.options(concurrency_group=PROBE_GROUP).remote()

    def health(self) -> list[dict[str, Any]]:
        """Each replica: alive or dead (and why), running and waiting requests (its last reply)."""
        return health_entries(self.replicas)

    def snapshot(self) -> EngineSnapshot:
        """Totals over the replicas and each replica's own figures (``/metrics`` label ``replica``)."""
        return totals(self.replicas)

    def shutdown(self) -> None:
        """Kill the replica actors (the server is done with them)."""
        for rep in self.replicas:
            if rep.alive:
                self._ray.kill(rep.actor)
            rep.alive = False
