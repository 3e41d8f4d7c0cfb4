"""The simulator: the real scheduler and KV manager (metadata only) over virtual time.

Arrivals are events by timestamp; each replica (`replica.Replica`) steps with the engine's contract and
its own clock; the replica whose clock is earliest runs next, after every arrival up to that instant was
routed. Nothing here re-implements a scheduling decision: with one replica the step sequence is exactly
what an engine loop over the same scheduler would do (see tests/sim/test_simulator.py).
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError, SchedulerDeadlockError
from kvsched.core.routing import ROUTER_KINDS
from kvsched.sim.cost import CostModel
from kvsched.sim.metrics import SLO, MetricsRecorder
from kvsched.sim.prompt_keys import SegmentKeys
from kvsched.sim.replica import Replica, StepDecision, decision_of, make_request
from kvsched.sim.routing import SimRouter
from kvsched.sim.speculation import SimSpeculation
from kvsched.sim.workload import RequestSpec

__all__ = ["ROUTERS", "SimResult", "Simulator", "StepDecision", "decision_of", "make_request"]

ROUTERS = ROUTER_KINDS  # the core's routers (kvsched.core.routing), the same the Ray front-end uses


@dataclass(slots=True)
class SimResult:
    """One run: the summary figures, the raw recorder (for plots), and the decisions if recorded."""

    name: str
    summary: dict[str, Any]
    recorder: MetricsRecorder
    kv_stats: dict[str, Any]
    decisions: list[StepDecision] = field(default_factory=list)
    wall_s: float = 0.0


class Simulator:
    """Runs one workload through `num_replicas` identical instances; `run()` may be called once.

    `lora_pages=(device pages, pages per adapter)` gives each replica a PEFT page budget for LoRA adapters.
    Routers (`kvsched.core.routing`, through `sim/routing.py`): `least_loaded` (fewest active requests),
    `round_robin`, `sticky` (a conversation's turns go where its first ran, so its prefix is cached there;
    first turns least-loaded), `kv_aware` (fewest prefill tokens not cached there plus load, fed by the
    replicas' KV events; `router_options` are its weights and thresholds).
    `speculation` makes every replica decode speculatively (`sim/speculation.py`).
    `max_concurrency=N` is a closed loop, as `vllm bench serve --max-concurrency` drives a server: a request
    is submitted at its arrival time or, when N are in the system, the instant one finishes; its latencies
    count from that submission, as such a client counts them.
    """

    def __init__(
        self,
        specs: Sequence[RequestSpec],
        cost_model: CostModel,
        cache_config: CacheConfig,
        *,
        scheduler: str = "unified",
        block_bytes: float = 0.0,
        slo: SLO | None = None,
        record_decisions: bool = False,
        progress: bool = False,
        name: str | None = None,
        num_replicas: int = 1,
        router: str = "least_loaded",
        router_options: dict[str, Any] | None = None,
        lora_pages: tuple[int, int] | None = None,
        speculation: SimSpeculation | None = None,
        max_concurrency: int | None = None,
        **scheduler_kwargs: Any,
    ) -> None:
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1
        ):
            raise ConfigError(f"max_concurrency={max_concurrency!r} is invalid: must be an integer >= 1")
        self.max_concurrency = max_concurrency
        ids = [s.request_id for s in specs]
        if len(set(ids)) != len(ids):
            raise ConfigError("workload has duplicate request ids")
        self.specs = {s.request_id: s for s in specs}
        for s in specs:
            if s.parent is not None and s.parent not in self.specs:
                raise ConfigError(f"request {s.request_id}: parent {s.parent} is not in the workload")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ConfigError(f"num_replicas={num_replicas!r} is invalid: must be an integer >= 1")
        self.routing = SimRouter(router, cache_config.tokens_per_block, router_options)
        if self.routing.wants_events:  # the router's index is fed by every replica's KV events
            cache_config = replace(cache_config, enable_kv_events=True)
        self.rec = MetricsRecorder()
        self.decisions: list[StepDecision] | None = [] if record_decisions else None
        self.replicas = [
            Replica(i, cache_config, scheduler, cost_model, self.specs, self.rec, block_bytes, self.decisions,
                    lora_pages, speculation=speculation, **scheduler_kwargs)
            for i in range(num_replicas)
        ]  # fmt: skip
        if cache_config.enable_block_reuse:  # trace blocks keyed once per segment (sim/prompt_keys.py)
            # One source per block size: a draft cache may use blocks of another size.
            sources: dict[int, SegmentKeys] = {}
            for rep in self.replicas:
                for kv in (rep.kv,) if rep.draft is None else (rep.kv, rep.draft.kv):
                    tpb = kv.tokens_per_block
                    source = sources.get(tpb)
                    if source is None:
                        source = sources[tpb] = SegmentKeys(self.specs, tpb)
                    kv.set_prompt_keys(source)
        self.routing.attach(self.replicas)
        self.kv = self.replicas[0].kv
        self.scheduler = self.replicas[0].scheduler
        self.router = self.routing.kind
        self.block_bytes = block_bytes
        self.slo = slo or SLO()
        self.progress = progress
        self.name = name or scheduler
        self.max_blocks = cache_config.num_device_blocks
        self.tpb = cache_config.tokens_per_block
        self._cpu = 0.0

    def run(self) -> SimResult:
        with _cyclic_gc_paused():
            return self._run()

    def _run(self) -> SimResult:
        specs, reps = self.specs, self.replicas
        children: dict[int, list[RequestSpec]] = {}
        heap: list[tuple[float, int]] = []
        for s in specs.values():
            if s.parent is None:
                heap.append((s.arrival_time, s.request_id))
            else:
                children.setdefault(s.parent, []).append(s)
        heapq.heapify(heap)
        route = self.routing.route
        rejected = 0
        limit = self.max_concurrency
        coupled = bool(children) or limit is not None  # a finish can schedule an arrival
        # closed loop: when each free slot freed up; arrived requests waiting for one (FIFO); requests
        # whose slot is taken, due for submission at their heap time
        free_slots = [0.0] * (limit or 0)
        waiting: deque[int] = deque()
        submitted: set[int] = set()
        bar = _progress(len(specs)) if self.progress else None
        t_wall = time.perf_counter()
        t_cpu = time.process_time()
        while True:
            rep = None
            t_rep = math.inf
            for r in reps:
                if r.active and r.clock < t_rep:
                    rep, t_rep = r, r.clock
            if heap and heap[0][0] <= t_rep:  # arrivals first, up to the next step's start
                t, rid = heapq.heappop(heap)
                spec = specs[rid]
                if -(-spec.total_tokens // self.tpb) > self.max_blocks:
                    rejected += 1  # can never fit the device pool: refused at admission, as a server would
                    self._release(rid, t, children, heap)
                    continue
                if limit is not None and rid not in submitted:
                    if waiting or not free_slots:
                        waiting.append(rid)
                        continue
                    freed = heapq.heappop(free_slots)
                    if freed > t:  # the slot frees after this arrival: submit then
                        submitted.add(rid)
                        heapq.heappush(heap, (freed, rid))
                        continue
                submitted.discard(rid)
                route(spec).admit(spec, t)
                continue
            if rep is None:
                break
            rep.horizon = self._horizon(rep, heap, coupled)
            finished = rep.step()
            if finished is None:  # nothing runnable: wait for the next event that can change that
                self._wait(rep, heap)
                continue
            if finished:
                for r in finished:
                    self._release(r.request_id, rep.clock, children, heap)
                if limit is not None:
                    for _ in finished:  # each freed slot goes to the longest-waiting request, now
                        if waiting:
                            nxt = waiting.popleft()
                            submitted.add(nxt)
                            heapq.heappush(heap, (rep.clock, nxt))
                        else:
                            heapq.heappush(free_slots, rep.clock)
                if bar is not None:
                    bar.update(len(finished))
        wall = time.perf_counter() - t_wall
        self._cpu = time.process_time() - t_cpu
        if bar is not None:
            bar.close()
        return self._result(wall, rejected)

    def _horizon(self, rep: Replica, heap: list[tuple[float, int]], coupled: bool) -> float:
        """Where a decode window of ``rep`` (sim/decode_window.py) must stop: at the next arrival, and
        at the clock of any other replica whose step could create one (a finish releases a
        conversation's next turn or a closed-loop slot) or that waits (it retries at each event)."""
        h = heap[0][0] if heap else math.inf
        for r in self.replicas:
            if r is not rep and r.active and r.clock < h and (coupled or r.stalled):
                h = r.clock
        return h

    def _wait(self, rep: Replica, heap: list[tuple[float, int]]) -> None:
        """Move a replica that can run nothing to the next event: an arrival or another replica's step."""
        now = rep.clock
        later = [r.clock for r in self.replicas if r is not rep and r.active]
        if heap:
            later.append(heap[0][0])
        if not later:
            raise SchedulerDeadlockError(
                f"replica {rep.index}: {len(rep.active)} requests left but the scheduler runs none"
            )
        nxt = min(later)
        # a replica due at the same instant steps first; then this one retries just after it
        rep.clock = nxt if nxt > now else math.nextafter(now, math.inf)

    def _release(self, rid: int, now: float, children: dict, heap: list) -> None:
        for child in children.pop(rid, ()):
            heapq.heappush(heap, (now + child.arrival_time, child.request_id))

    def _result(self, wall: float, rejected: int) -> SimResult:
        reps, rec = self.replicas, self.rec
        stats = [asdict(r.kv.stats()) for r in reps]
        st = {k: sum(s[k] for s in stats) for k in stats[0]}
        summary = rec.summary(self.slo, self.kv.num_device_blocks, self.kv.num_host_blocks)
        hits = st["reuse_hit_tokens_device"] + st["reuse_hit_tokens_host"]
        reused = sum(r.reused for r in reps)
        ctx_tokens = sum(r.context_tokens for r in reps)
        summary.update(
            {
                "replicas": len(reps),
                "router": self.router,
                "rejected": rejected,
                "suspends": st["num_suspends"],
                "resumes": st["num_resumes"],
                "preemptions": sum(r.preemptions for r in reps),
                "recomputed_tokens": sum(r.recomputed for r in reps),
                "prefix_hit_tokens_device": st["reuse_hit_tokens_device"],
                "prefix_hit_tokens_host": st["reuse_hit_tokens_host"],
                # reused / computed-or-reused context tokens, counted once per completed context
                "prefix_hit_rate": reused / ctx_tokens if ctx_tokens else 0.0,
                # the manager's counters (once per admitted context) give the split between tiers
                "prefix_hit_host_share": st["reuse_hit_tokens_host"] / hits if hits else 0.0,
                "d2h_gb": st["offload_blocks"] * self.block_bytes / 1e9,
                "h2d_gb": st["onboard_blocks"] * self.block_bytes / 1e9,
                "wall_s": wall,
                "cpu_s": self._cpu,
                # per CPU second: the figure that does not depend on what else runs on the machine
                "sim_steps_per_s": rec.num_steps / self._cpu if self._cpu > 0 else 0.0,
            }
        )
        if any(r.lora_loads for r in reps):  # adapters copied host -> device (each residency once)
            summary["lora_loads"] = sum(r.lora_loads for r in reps)
        if reps[0].spec is not None:
            steps, drafts = sum(r.spec_steps for r in reps), sum(r.spec_drafts for r in reps)
            accepted = sum(r.spec_accepted for r in reps)
            summary["spec_acceptance_rate"] = accepted / drafts if drafts else 0.0
            # accepted drafts per speculative decode step of a request (the engine's figure of that name)
            summary["spec_mean_accepted_tokens_per_step"] = accepted / steps if steps else 0.0
        return SimResult(self.name, summary, rec, st, self.decisions or [], wall)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="req", mininterval=0.5)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a run, then restore it as it was.

    A run allocates millions of long-lived objects (blocks, requests, metrics samples) and almost no
    reference cycles (about 300 cyclic objects after a 2,000-request trace run): the collector's full
    passes over that heap cost about 9 % of the run's CPU time and free nothing. Reference counting
    frees everything else as usual; the few cycles go at the collector's next pass after the run.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
