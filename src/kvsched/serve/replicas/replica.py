"""One engine replica: an :class:`~kvsched.engine.engine.Engine` with its own KV pools, driven step by step.

A plain class with no Ray import: ``ReplicatedBackend`` wraps it with ``ray.remote`` (one actor per
replica, as Ray's actor model has it: one process, methods run one at a time, in the order each caller
sent them), and the tests can call it in-process. Each :meth:`EngineReplica.step` reply carries what the
front-end needs to route the next requests: the step's outputs, the finished requests' results, the KV
events the step produced (for a KV-aware router) and the replica's load.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvsched.core.errors import UnknownRequestError
from kvsched.core.kvcache import KVEvent
from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.outputs import RequestOutput, StepOutput
from kvsched.serve.backend import EngineBackend
from kvsched.serve.metrics import EngineSnapshot


@dataclass(slots=True)
class ReplicaInfo:
    """What the front-end checks a request against before routing it (the engine's own limits)."""

    max_model_len: int
    vocab_size: int
    tokens_per_block: int
    num_device_blocks: int
    lora_names: tuple[str, ...]
    #: adapter name -> the id the engine keys its cached blocks with (the router keys prompts the same way)
    lora_ids: dict[str, int]
    pid: int


@dataclass(slots=True)
class StepReply:
    """One step of one replica, as the front-end sees it."""

    outputs: list[StepOutput]
    #: The finished requests' results (their metrics feed /metrics), taken from the engine.
    results: dict[Hashable, RequestOutput]
    #: KV events of this step (blocks stored / removed per tier), oldest first.
    events: list[KVEvent]
    snapshot: EngineSnapshot
    num_unfinished: int
    #: Requests the engine refused in ``add`` (id, error type name, message); the front-end checked
    #: them already, so this only happens on a race (an adapter unloaded meanwhile).
    rejected: list[tuple[Hashable, str, str]] = field(default_factory=list)


class EngineReplica:
    """An engine and the calls the front-end makes on it; requests are identified by the front-end's ids."""

    def __init__(self, args: EngineArgs | None = None, *, engine: Engine | None = None) -> None:
        """Builds its engine from ``args`` (in the actor's process); or takes ``engine`` (in-process use)."""
        if (args is None) == (engine is None):
            raise ValueError("give EngineReplica engine args or an engine, not both or neither")
        self.engine = engine if engine is not None else Engine(args)
        self.backend = EngineBackend(self.engine)
        self._rejected: list[tuple[Hashable, str, str]] = []

    def info(self) -> ReplicaInfo:
        parts = self.engine.parts
        return ReplicaInfo(
            max_model_len=self.engine.max_model_len,
            vocab_size=parts.vocab_size,
            tokens_per_block=self.engine.kv.tokens_per_block,
            num_device_blocks=self.engine.kv.num_device_blocks,
            lora_names=self.backend.lora_names,
            lora_ids=dict(self.engine.lora_names),
            pid=os.getpid(),
        )

    def add(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: Hashable,
        priority: int,
        age_s: float,
        cache_salt: int | None,
        lora: str | None,
    ) -> None:
        """Queue a request. ``age_s``: how long ago the front-end received it (clocks of two processes,
        or two hosts, are not comparable; an age is), so TTFT still starts at the HTTP arrival."""
        arrival = time.monotonic() - max(0.0, age_s)
        try:
            self.backend.add_request(token_ids, params, request_id, priority, arrival, cache_salt, lora=lora)
        except Exception as exc:  # reported with the next step: the caller does not wait for adds
            self._rejected.append((request_id, type(exc).__name__, str(exc)))

    def abort(self, request_id: Hashable) -> None:
        """Abort a request (the client went away); its result is dropped."""
        with contextlib.suppress(UnknownRequestError):
            self.backend.abort_request(request_id)

    def step(self) -> StepReply:
        outputs = self.backend.step() if self.backend.has_unfinished_requests() else []
        results: dict[Hashable, RequestOutput] = {}
        for out in outputs:
            if out.finished:
                result = self.backend.release(out.request_id)
                if result is not None:
                    results[out.request_id] = result
        rejected, self._rejected = self._rejected, []
        return StepReply(
            outputs=outputs,
            results=results,
            events=self.engine.drain_kv_events(),
            snapshot=self.backend.snapshot(),
            num_unfinished=self.engine.num_unfinished_requests,
            rejected=rejected,
        )

    def ping(self) -> int:
        """A cheap call that fails once the actor is dead (the health probe of an idle replica)."""
        return os.getpid()
