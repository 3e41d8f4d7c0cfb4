"""Prometheus metrics of one server (names shaped like vLLM's ``vllm:*``, prefixed ``kvsched:``).

Each server owns its CollectorRegistry, so several servers in one process (tests) do not collide.
Gauges are set by the engine thread after each step from an :class:`EngineSnapshot`; cumulative engine
counters (suspends, resumes, prefix hits) are advanced by their deltas; latency histograms are
observed by the engine thread when a request ends, from the engine's ``RequestOutput.metrics`` (the one
record of a request's times; the server keeps no clock of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvsched.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(slots=True)
class EngineSnapshot:
    """Engine state after a step; counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    num_paused: int = 0
    device_kv_usage: float = 0.0
    host_kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_suspends: int = 0
    num_resumes: int = 0
    num_preemptions: int = 0
    #: With engine replicas (``serve/replicas``): each replica's own figures; empty for one engine.
    replicas: tuple[ReplicaSnapshot, ...] = field(default=())


@dataclass(slots=True)
class ReplicaSnapshot:
    """One engine replica behind the router: alive or dead, requests routed to it, its engine's state."""

    replica: int
    alive: bool
    routed: int
    engine: EngineSnapshot


class ServerMetrics:
    """All metrics of one server; ``render()`` is the /metrics body."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        reg, labels = self.registry, {"model_name": model_name}
        self._last = EngineSnapshot()

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"kvsched:{name}", doc, ("model_name", *extra), registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"kvsched:{name}", doc, ("model_name", *extra), registry=reg)

        self.running = gauge("num_requests_running", "Requests scheduled in the engine.").labels(**labels)
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.").labels(**labels)
        self.paused = gauge("num_requests_paused", "Requests suspended to the host tier.").labels(**labels)
        kv = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use, per tier.", ("tier",))
        self.kv_device = kv.labels(tier="device", **labels)
        self.kv_host = kv.labels(tier="host", **labels)
        self.prefix_hit_rate = gauge(
            "prefix_cache_hit_rate", "Prefix-cache hits / queries since start."
        ).labels(**labels)
        self.prefix_queries = counter("prefix_cache_queries", "Prefix-cache lookups.").labels(**labels)
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache lookups that hit.").labels(**labels)
        self.suspends = counter("num_suspends", "Requests suspended to the host tier.").labels(**labels)
        self.resumes = counter("num_resumes", "Suspended requests resumed.").labels(**labels)
        self.preemptions = counter("num_preemptions", "Requests preempted for recompute.").labels(**labels)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.").labels(**labels)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(**labels)
        # Speculative decoding, as vLLM's spec_decode counters (from each finished request's metrics).
        self.spec_drafts = counter(
            "spec_decode_num_drafts", "Decode steps that verified draft tokens."
        ).labels(**labels)
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.").labels(
            **labels
        )
        self.spec_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens the target accepted."
        ).labels(**labels)
        self._success = counter("request_success", "Finished requests by reason.", ("finished_reason",))
        self._labels = labels
        self._replicas = _ReplicaSeries(gauge, counter)
        self.rejected = counter("request_rejected", "Requests refused (429, queue full).").labels(**labels)
        self.ttft = Histogram(
            "kvsched:time_to_first_token_seconds",
            "Time to first token.",
            ("model_name",),
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self.tpot = Histogram(
            "kvsched:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ("model_name",),
            buckets=_TPOT_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self.e2e = Histogram(
            "kvsched:e2e_request_latency_seconds",
            "Arrival to finish (the last token, or the abort).",
            ("model_name",),
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**labels)

    def update_engine(self, snap: EngineSnapshot) -> None:
        """Called by the engine thread after each step."""
        self.running.set(snap.num_running)
        self.waiting.set(snap.num_waiting)
        self.paused.set(snap.num_paused)
        self.kv_device.set(snap.device_kv_usage)
        self.kv_host.set(snap.host_kv_usage)
        last = self._last
        for counter, now, before in (
            (self.prefix_queries, snap.prefix_queries, last.prefix_queries),
            (self.prefix_hits, snap.prefix_hits, last.prefix_hits),
            (self.suspends, snap.num_suspends, last.num_suspends),
            (self.resumes, snap.num_resumes, last.num_resumes),
            (self.preemptions, snap.num_preemptions, last.num_preemptions),
        ):
            if now > before:
                counter.inc(now - before)
        if snap.prefix_queries:
            self.prefix_hit_rate.set(snap.prefix_hits / snap.prefix_queries)
        self._last = snap
        for rep in snap.replicas:
            self._replicas.update(rep, self._labels)

    def observe_finished(self, finish_reason: str, result: RequestOutput | None) -> None:
        """Called by the engine thread when a request ends: ``stop`` / ``length`` as the engine said,
        ``abort`` (client gone), ``error`` (engine failure or shutdown); ``result`` is the engine's,
        ``None`` for a request it refused (counted, but it has no tokens or latencies)."""
        self._success.labels(finished_reason=finish_reason, **self._labels).inc()
        if result is None:
            return
        m = result.metrics
        self.prompt_tokens.inc(len(result.prompt_token_ids))
        self.generation_tokens.inc(m.num_generation_tokens)
        if m.num_speculative_steps:
            self.spec_drafts.inc(m.num_speculative_steps)
            self.spec_draft_tokens.inc(m.num_draft_tokens)
            self.spec_accepted_tokens.inc(m.num_accepted_draft_tokens)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaSeries:
    """Per-replica series (label ``replica``), made once a replicated backend reports replicas."""

    def __init__(self, gauge, counter) -> None:  # noqa: ANN001 - ServerMetrics' factories
        extra = ("replica",)
        self.alive = gauge("replica_alive", "1 while the engine replica serves, 0 once it died.", extra)
        self.running = gauge("replica_num_requests_running", "Requests scheduled on the replica.", extra)
        self.waiting = gauge("replica_num_requests_waiting", "Requests waiting on the replica.", extra)
        self.kv = gauge(
            "replica_kv_cache_usage_perc", "Fraction of the replica's device KV blocks in use.", extra
        )
        self.routed = counter("replica_requests_routed", "Requests the router sent to the replica.", extra)
        self.queries = counter(
            "replica_prefix_cache_queries", "Prompt tokens looked up in its prefix cache.", extra
        )
        self.hits = counter("replica_prefix_cache_hits", "Prompt tokens found in its prefix cache.", extra)
        self._last: dict[int, tuple[int, int, int]] = {}

    def update(self, rep: ReplicaSnapshot, labels: dict[str, str]) -> None:
        lab = {"replica": str(rep.replica), **labels}
        s = rep.engine
        self.alive.labels(**lab).set(1 if rep.alive else 0)
        self.running.labels(**lab).set(s.num_running if rep.alive else 0)
        self.waiting.labels(**lab).set(s.num_waiting if rep.alive else 0)
        self.kv.labels(**lab).set(s.device_kv_usage if rep.alive else 0.0)
        before = self._last.get(rep.replica, (0, 0, 0))
        now = (rep.routed, s.prefix_queries, s.prefix_hits)
        for counter, n, b in zip((self.routed, self.queries, self.hits), now, before):
            child = counter.labels(**lab)  # made at 0 on first sight: every replica has its series
            if n > b:
                child.inc(n - b)
        self._last[rep.replica] = now
