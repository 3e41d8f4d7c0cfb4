"""KV-aware routing: send a request where the fewest of its prefill tokens must be computed, minus load.

The cost of replica ``r`` for a prompt of ``n`` tokens, as Dynamo's KV router weighs new prefill blocks
against a worker's active blocks (https://docs.nvidia.com/dynamo/design-docs/router-design) and llm-d's
scheduler adds weighted prefix-cache, queue and KV-utilisation scorers
(https://llm-d.ai/docs/0.8/architecture/core/router/epp/scheduling)::

    cost(r) = n - dev(r) - (1 - host_hit_weight) * host(r)                 # prefill tokens to pay for
            + running_weight * running(r) + waiting_weight * waiting(r)   # load, in token equivalents
            + kv_weight * kv_usage(r)

``dev(r)`` / ``host(r)``: tokens of the prompt's leading whole blocks cached on r's device / host tier
(``PrefixIndex.match``). A host hit costs ``host_hit_weight`` of a recompute (a copy back, not free) and a
device hit nothing. The lowest cost wins; ties go to the least-loaded replica, then the lowest id.

Overload, as SGLang's cache-aware router balances (https://pypi.org/project/sgl-router/) and Ray Serve's
PrefixCacheAffinityRouter checks ``imbalanced_threshold`` first
(https://docs.ray.io/en/latest/serve/llm/prefix-aware-request-router.html): replica r is overloaded when
``queue(r) - min_queue > balance_abs_threshold`` and ``queue(r) > balance_rel_threshold * min_queue``
(queue = running + waiting). Overloaded replicas are not candidates for a prefix or a session.

Order of decisions: a known session whose replica is live and not overloaded stays there; otherwise the
prompt's keys are matched; no cached block on any candidate (an unknown prefix) means least-loaded; else
the lowest cost. The chosen replica becomes the session's, and the prompt's blocks are predicted there
for ``predict_ttl`` routing decisions (counted as device hits until its events confirm or drop them),
so that requests sharing a prefix that arrive while the first one's prefill runs follow it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import KVEvent
from kvsched.core.routing.index import PrefixIndex, prompt_keys
from kvsched.core.routing.load import ReplicaLoad, check_loads, least_loaded
from kvsched.core.routing.routers import SessionTable


class KVAwareRouter:
    """The cost above over a ``PrefixIndex`` fed by the replicas' KV events (``on_events``)."""

    wants_events = True
    wants_sessions = True  # a known session stays on its replica (see the order of decisions above)

    __slots__ = (
        "block_size",
        "host_hit_weight",
        "running_weight",
        "waiting_weight",
        "kv_weight",
        "balance_abs_threshold",
        "balance_rel_threshold",
        "index",
        "sessions",
        "predict_ttl",
    )

    def __init__(
        self,
        block_size: int,
        *,
        host_hit_weight: float = 0.25,
        running_weight: float = 16.0,
        waiting_weight: float = 256.0,
        kv_weight: float = 1024.0,
        balance_abs_threshold: int = 16,
        balance_rel_threshold: float = 1.5,
        max_sessions: int = 100_000,
        predict_ttl: int = 64,
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} is invalid: must be an integer >= 1")
        if not 0.0 <= host_hit_weight <= 1.0:
            raise ConfigError(f"host_hit_weight={host_hit_weight!r} is invalid: must be in [0, 1]")
        for name, value in (
            ("running_weight", running_weight),
            ("waiting_weight", waiting_weight),
            ("kv_weight", kv_weight),
            ("balance_abs_threshold", balance_abs_threshold),
            ("predict_ttl", predict_ttl),
        ):
            if not value >= 0:
                raise ConfigError(f"{name}={value!r} is invalid: must be >= 0")
        if not balance_rel_threshold >= 1.0:
            raise ConfigError(f"balance_rel_threshold={balance_rel_threshold!r} is invalid: must be >= 1")
        self.block_size = block_size
        self.host_hit_weight = float(host_hit_weight)
        self.running_weight = float(running_weight)
        self.waiting_weight = float(waiting_weight)
        self.kv_weight = float(kv_weight)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = float(balance_rel_threshold)
        self.predict_ttl = int(predict_ttl)
        self.index = PrefixIndex()
        self.sessions = SessionTable(max_sessions)

    def on_events(self, replica: int, events: Iterable[KVEvent]) -> None:
        self.index.apply(replica, events)

    def remove_replica(self, replica: int) -> None:
        self.index.remove_replica(replica)
        self.sessions.drop_replica(replica)

    def overloaded(self, load: ReplicaLoad, min_queue: int) -> bool:
        q = load.num_running + load.num_waiting
        return q - min_queue > self.balance_abs_threshold and q > self.balance_rel_threshold * min_queue

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
        keys = prompt_keys(token_ids, self.block_size, lora_id=lora_id, salt=salt)
        pick, known = self._choose(keys, len(token_ids), loads, session)
        if session is not None:
            self.sessions.put(session, pick)
        if self.predict_ttl:  # the leading blocks known there already need no prediction
            self.index.predict(pick, keys[known:] if known else keys, self.predict_ttl)
        return pick

    def _choose(
        self, keys: list[bytes], n: int, loads: Mapping[int, ReplicaLoad], session: Hashable | None
    ) -> tuple[int, int]:
        """The pick and how many leading keys the index already has there (0 if not matched)."""
        min_queue = min(ld.num_running + ld.num_waiting for ld in loads.values())
        if session is not None:
            rid = self.sessions.get(session)
            if rid is not None:
                load = loads.get(rid)
                if load is not None and not self.overloaded(load, min_queue):
                    return rid, 0
        hits = self.index.match(keys, predicted=self.predict_ttl > 0)
        candidates = {r: ld for r, ld in loads.items() if not self.overloaded(ld, min_queue)}
        if not any(r in candidates for r in hits):
            pick = least_loaded(loads)  # unknown prefix (or cached only where overloaded)
            return pick, sum(hits.get(pick, (0, 0)))
        bs = self.block_size
        host_factor = 1.0 - self.host_hit_weight
        best = -1
        best_key: tuple[float, int, int] = (0.0, 0, 0)
        for rid, ld in candidates.items():
            dev, host = hits.get(rid, (0, 0))
            queue = ld.num_running + ld.num_waiting
            cost = (
                n
                - dev * bs
                - host_factor * host * bs
                + self.running_weight * ld.num_running
                + self.waiting_weight * ld.num_waiting
                + self.kv_weight * ld.kv_usage
            )
            key = (cost, queue, rid)
            if best < 0 or key < best_key:
                best, best_key = rid, key
        return best, sum(hits.get(best, (0, 0)))
