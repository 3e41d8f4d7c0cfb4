"""The simulated executor: the real scheduler and KV manager (metadata only) over virtual time.

Each loop iteration is one engine step with the same contract as the engine: admit arrivals, call
`scheduler.schedule(active)`, charge the batch to the cost model instead of running a forward, feed
deterministic tokens to `core.step.apply_step`, drop finished requests. Nothing here re-implements a
scheduling decision.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError, SchedulerDeadlockError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request
from kvsched.core.scheduler import make_scheduler
from kvsched.core.step import apply_step
from kvsched.sim.cost import CostModel, StepShape
from kvsched.sim.metrics import SLO, MetricsRecorder
from kvsched.sim.workload import RequestSpec


@dataclass(slots=True, frozen=True)
class StepDecision:
    """What the scheduler decided in one step (compared against the engine's in identity tests)."""

    step: int
    context: tuple[tuple[int, int], ...]  # (request id, chunk size)
    generation: tuple[int, ...]
    paused: tuple[int, ...]
    preempted: tuple[int, ...]


@dataclass(slots=True)
class SimResult:
    """One run: the summary figures, the raw recorder (for plots), and the decisions if recorded."""

    name: str
    summary: dict[str, Any]
    recorder: MetricsRecorder
    kv_stats: dict[str, Any]
    decisions: list[StepDecision] = field(default_factory=list)
    wall_s: float = 0.0


def decision_of(step: int, out: Any) -> StepDecision:
    return StepDecision(
        step,
        tuple((r.request_id, r.context_chunk_size) for r in out.context_requests),
        tuple(r.request_id for r in out.generation_requests),
        tuple(r.request_id for r in out.paused_requests),
        tuple(r.request_id for r in getattr(out, "preempted_requests", ())),
    )


def make_request(spec: RequestSpec, now: float) -> Request:
    return Request(
        spec.request_id, spec.prompt_tokens(), spec.output_len, lora_id=spec.lora_id, arrival_time=now
    )


class Simulator:
    """Runs one workload through one scheduler configuration; `run()` may be called once."""

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
        **scheduler_kwargs: Any,
    ) -> None:
        ids = [s.request_id for s in specs]
        if len(set(ids)) != len(ids):
            raise ConfigError("workload has duplicate request ids")
        self.specs = {s.request_id: s for s in specs}
        for s in specs:
            if s.parent is not None and s.parent not in self.specs:
                raise ConfigError(f"request {s.request_id}: parent {s.parent} is not in the workload")
        self.cost_model = cost_model
        self.kv = KVCacheManager(cache_config)
        self.scheduler = make_scheduler(scheduler, self.kv, **scheduler_kwargs)
        self.block_bytes = block_bytes
        self.slo = slo or SLO()
        self.record_decisions = record_decisions
        self.progress = progress
        self.name = name or scheduler
        self.max_blocks = cache_config.num_device_blocks
        self.tpb = cache_config.tokens_per_block
        self._preemptions = 0
        self._reused = 0
        self._context_tokens = 0
        self._recomputed = 0

    def run(self) -> SimResult:
        kv, sched, cost, specs = self.kv, self.scheduler, self.cost_model, self.specs
        rec = MetricsRecorder()
        decisions: list[StepDecision] = []
        children: dict[int, list[RequestSpec]] = {}
        heap: list[tuple[float, int]] = []
        for s in specs.values():
            if s.parent is None:
                heap.append((s.arrival_time, s.request_id))
            else:
                children.setdefault(s.parent, []).append(s)
        heapq.heapify(heap)
        shape = StepShape()
        active: list[Request] = []
        last_tok: dict[int, float] = {}
        itl = rec.itl
        tpb, block_bytes = self.tpb, self.block_bytes
        rejected = 0
        now = 0.0
        step = 0
        stats = kv.stats()
        off_blocks, on_blocks = stats.offload_blocks, stats.onboard_blocks
        bar = _progress(len(specs)) if self.progress else None
        t_wall = time.perf_counter()
        while heap or active:
            while heap and heap[0][0] <= now:
                t, rid = heapq.heappop(heap)
                spec = specs[rid]
                if -(-spec.total_tokens // tpb) > self.max_blocks:
                    rejected += 1  # can never fit the device pool: refused at admission, as a server would
                    self._release_children(rid, t, children, heap)
                    continue
                active.append(make_request(spec, t))
            if not active:
                if heap:
                    now = heap[0][0]
                continue
            out = sched.schedule(active)
            ctx, gen = out.context_requests, out.generation_requests
            if not ctx and not gen:
                if heap:
                    now = max(now, heap[0][0])  # nothing can run before the next arrival changes things
                    continue
                raise SchedulerDeadlockError(f"{len(active)} requests left but the scheduler runs none")
            shape.reset()
            sampled: dict[int, list[int]] = {}
            for r in ctx:
                last = r.is_last_context_chunk
                shape.add_context(r.context_current_position, r.context_chunk_size, last)
                if last:
                    sampled[r.request_id] = [specs[r.request_id].output_token(len(r.output_token_ids))]
            for r in gen:
                shape.add_decode(r.num_tokens - 1, 1 + len(r.draft_tokens))
                sampled[r.request_id] = [specs[r.request_id].output_token(len(r.output_token_ids))]
            stats = kv.stats()
            shape.d2h_bytes = (stats.offload_blocks - off_blocks) * block_bytes
            shape.h2d_bytes = (stats.onboard_blocks - on_blocks) * block_bytes
            off_blocks, on_blocks = stats.offload_blocks, stats.onboard_blocks
            dt = cost.step_time(shape)
            now += dt
            if self.record_decisions:
                decisions.append(decision_of(step, out))
            step += 1
            for r in gen:
                rid = r.request_id
                itl.append(now - last_tok[rid])
                last_tok[rid] = now
            for r in ctx:
                if r.request_id in sampled:
                    last_tok[r.request_id] = now
                    self._reused += r.num_reused_tokens
                    self._context_tokens += r.num_context_tokens
            finished = apply_step(out, sampled, kv, now=now)
            rec.step(
                now,
                dt,
                stats.used_device_blocks,
                stats.used_host_blocks,
                len(ctx) + len(gen),
                shape.num_tokens,
            )
            if finished:
                for r in finished:
                    rid = r.request_id
                    del last_tok[rid]
                    self._preemptions += r.num_preemptions
                    self._recomputed += r.num_recomputed_tokens
                    rec.request_done(
                        r.arrival_time, r.metrics["first_token"], now, r.prompt_len, len(r.output_token_ids)
                    )
                    self._release_children(rid, now, children, heap)
                active = [r for r in active if not r.is_finished]
                if bar is not None:
                    bar.update(len(finished))
        wall = time.perf_counter() - t_wall
        if bar is not None:
            bar.close()
        return self._result(rec, decisions, wall, rejected)

    def _release_children(self, rid: int, now: float, children: dict, heap: list) -> None:
        for child in children.pop(rid, ()):
            heapq.heappush(heap, (now + child.arrival_time, child.request_id))

    def _result(
        self, rec: MetricsRecorder, decisions: list[StepDecision], wall: float, rejected: int
    ) -> SimResult:
        kv = self.kv
        st = kv.stats()
        summary = rec.summary(self.slo, kv.num_device_blocks, kv.num_host_blocks)
        hits = st.reuse_hit_tokens_device + st.reuse_hit_tokens_host
        summary.update(
            {
                "rejected": rejected,
                "suspends": st.num_suspends,
                "resumes": st.num_resumes,
                "preemptions": self._preemptions,
                "recomputed_tokens": self._recomputed,
                "prefix_hit_tokens_device": st.reuse_hit_tokens_device,
                "prefix_hit_tokens_host": st.reuse_hit_tokens_host,
                # reused / computed-or-reused context tokens, counted once per completed context
                "prefix_hit_rate": self._reused / self._context_tokens if self._context_tokens else 0.0,
                # the manager counts every lookup (also ones dropped when the request had to wait): use
                # its counters only for the split between tiers
                "prefix_hit_host_share": st.reuse_hit_tokens_host / hits if hits else 0.0,
                "d2h_gb": st.offload_blocks * self.block_bytes / 1e9,
                "h2d_gb": st.onboard_blocks * self.block_bytes / 1e9,
                "wall_s": wall,
                "sim_steps_per_s": rec.num_steps / wall if wall > 0 else 0.0,
            }
        )
        return SimResult(self.name, summary, rec, _asdict(st), decisions, wall)


def _asdict(stats: Any) -> dict[str, Any]:
    return asdict(stats)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="req", mininterval=0.5)
