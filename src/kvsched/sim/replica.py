"""One simulated serving instance: its own KV manager (metadata only), scheduler, active list and clock.

`step()` is one engine iteration through the core's `StepLoop`, the loop the engine runs: `schedule(active)`,
run the batch (here: charge it to the cost model and advance the virtual clock), `apply_step` with
deterministic tokens; then record metrics and drop finished requests. With speculation
(`sim/speculation.py`) the step is the engine's speculative one: draft slots reserved before the pass,
`1 + accepted` tokens appended, both caches rewound to the accepted tokens afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager, KVEvent
from kvsched.core.loop import StepLoop
from kvsched.core.lora_residency import AdapterLRU
from kvsched.core.peft import PeftCache
from kvsched.core.protocols import Scheduler
from kvsched.core.request import Request
from kvsched.core.scheduler import SchedulerOutput, make_scheduler
from kvsched.core.scheduler.draft_mirror import BothCaches, reserve_draft_slots
from kvsched.sim.cost import CostModel, StepShape
from kvsched.sim.decode_window import eligible_batch, run_window
from kvsched.sim.lora_residency import lora_step
from kvsched.sim.metrics import MetricsRecorder
from kvsched.sim.speculation import DraftKV, SimSpeculation
from kvsched.sim.storage import CountingStorage
from kvsched.sim.workload import SMALL_TOKENS, RequestSpec, segment_tag


@dataclass(slots=True, frozen=True)
class StepDecision:
    """What the scheduler decided in one step (compared against the engine's in identity tests)."""

    step: int
    context: tuple[tuple[int, int], ...]  # (request id, chunk size)
    generation: tuple[int, ...]
    paused: tuple[int, ...]  # suspended, KV kept
    preempted: tuple[int, ...]  # KV dropped, to be recomputed
    replica: int = 0


def decision_of(step: int, out: SchedulerOutput, replica: int = 0) -> StepDecision:
    return StepDecision(
        step,
        tuple((r.request_id, r.context_chunk_size) for r in out.context_requests),
        tuple(r.request_id for r in out.generation_requests),
        tuple(r.request_id for r in out.paused_requests),
        tuple(r.request_id for r in out.preempted_requests),
        replica,
    )


def make_request(spec: RequestSpec, now: float) -> Request:
    return Request(
        spec.request_id,
        spec.prompt_tokens(),
        spec.output_len,
        lora_id=spec.lora_id,
        priority=spec.priority,
        arrival_time=now,
    )


class Replica:
    """A serving instance in virtual time; `clock` is when its next step may start."""

    def __init__(
        self,
        index: int,
        cache_config: CacheConfig,
        scheduler: str,
        cost_model: CostModel,
        specs: Mapping[int, RequestSpec],
        rec: MetricsRecorder,
        block_bytes: float,
        decisions: list[StepDecision] | None,
        lora_pages: tuple[int, int] | None = None,
        speculation: SimSpeculation | None = None,
        **scheduler_kwargs: Any,
    ) -> None:
        self.index = index
        self.storage = CountingStorage(int(round(block_bytes)))
        self.kv = KVCacheManager(cache_config, storage=self.storage)
        self.spec = speculation
        #: the draft model's KV cache, mirrored by the scheduler (speculation with a draft model)
        self.draft: DraftKV | None = None
        self._draft_storage = CountingStorage(0)
        step_kv: Any = self.kv
        if speculation is not None and speculation.draft_cache is not None:
            self._draft_storage = CountingStorage(int(round(speculation.draft_block_bytes)))
            self.draft = DraftKV(KVCacheManager(speculation.draft_cache, storage=self._draft_storage))
            scheduler_kwargs["draft_kv_cache_manager"] = self.draft.kv
            step_kv = BothCaches(self.kv, self.draft.kv)
        #: speculative counters: steps that proposed, drafts proposed, drafts accepted
        self.spec_steps = self.spec_drafts = self.spec_accepted = 0
        self._num_device = self.kv.num_device_blocks
        self._num_host = self.kv.num_host_blocks
        self._drain_events = cache_config.enable_kv_events
        #: a KV-aware router's feed: called with (replica index, events) after each step that made some
        self.on_events: Callable[[int, list[KVEvent]], None] | None = None
        # LoRA: (device pages for adapters, pages per adapter) -> the scheduler's PEFT page budget
        self.peft = None if lora_pages is None else PeftCache(lora_pages[0], lora_pages[1])
        if self.peft is not None:
            scheduler_kwargs["peft_cache"] = self.peft
        self.loop = StepLoop(
            make_scheduler(scheduler, self.kv, **scheduler_kwargs), step_kv, self._run, self._now
        )
        self.cost = cost_model
        # LoRA residency on the device (core/lora_residency.AdapterLRU: least recently used first)
        self._adapter_bytes = float(getattr(cost_model, "lora_adapter_bytes", 0.0))
        self.resident = AdapterLRU()
        self._has_lora = False
        self.lora_loads = 0  # adapters copied host -> device (each time one becomes resident)
        self.specs = specs
        self.rec = rec
        self.block_bytes = block_bytes
        self.decisions = decisions
        self.active: list[Request] = []
        self.clock = 0.0
        self.num_steps = 0
        self.last_tok: dict[int, float] = {}
        # request id -> its output-token function (None: plain ids, see _token) and its first token
        self._tok: dict[int, Callable[[int], int] | None] = {}
        self._base: dict[int, int] = {}
        self.shape = StepShape()
        self._dt = 0.0  # duration of the last step run
        self._off = self._on = self._calls = 0
        self._doff = self._don = self._dcalls = 0
        #: decode windows (sim/decode_window.py): on unless a test compares against step-by-step runs
        self.decode_windows = True
        #: the batch a window may replay, or None; `horizon`: windows start no step at or after it
        #: (the simulator sets it before each call: the next arrival, or another replica's clock)
        self._window: list[Request] | None = None
        self.horizon = -math.inf
        self.stalled = False  # the last regular step ran nothing
        # per-run counters read by the simulator's summary
        self.preemptions = self.recomputed = self.reused = self.context_tokens = 0

    def admit(self, spec: RequestSpec, t: float) -> None:
        if not self.active and self.clock < t:
            self.clock = t
        rid = spec.request_id
        # plain token ids (no vocab mapping): the tag, then SMALL_TOKENS[index]; no call per decode
        self._tok[rid] = spec.output_token if spec.vocab_size is not None else None
        self._base[rid] = segment_tag(spec.output_base)
        if spec.lora_id is not None:
            self._has_lora = True
        self.active.append(make_request(spec, t))
        self._window = None  # the next step schedules the newcomer

    def _token(self, rid: int, index: int) -> int:
        f = self._tok[rid]
        if f is not None:
            return f(index)
        return SMALL_TOKENS[index] if index else self._base[rid]

    @property
    def scheduler(self) -> Scheduler:
        return self.loop.scheduler

    def _now(self) -> float:
        return self.clock

    def _run(self, out: SchedulerOutput) -> dict[int, tuple[int, ...]]:
        """The loop's runner: the batch's cost moves the clock on; its tokens are deterministic."""
        ctx, gen = out.context_requests, out.generation_requests
        shape = self.shape
        shape.reset()
        sampled: dict[int, tuple[int, ...]] = {}
        for r in ctx:
            last = r.is_last_context_chunk
            shape.add_context(r.context_current_position, r.context_chunk_size, last)
            if last:
                sampled[r.request_id] = (self._token(r.request_id, len(r.output_token_ids)),)
        tok, small, last_tok = self._tok, SMALL_TOKENS, self.last_tok
        kv_sum = n_plain = 0
        rids = [r.request_id for r in gen]
        prev = list(map(last_tok.__getitem__, rids))
        spec = self.spec
        if spec is not None and self.draft is not None:
            self.draft.propose(out)  # before the drafts are judged, as the engine's draft runner
        for r in gen:  # add_decode inlined for the common one-token case (no drafts)
            rid = r.request_id
            n_out = len(r.output_token_ids)
            if r.draft_tokens:
                nd = len(r.draft_tokens)
                shape.add_decode(len(r.prompt_token_ids) + n_out - 1, 1 + nd)
                if spec is not None:  # the target verifies the drafts: 1 + accepted tokens
                    a = spec.acceptance.accepted(rid, nd)
                    self.spec_steps += 1
                    self.spec_drafts += nd
                    self.spec_accepted += a
                    sampled[rid] = tuple(self._token(rid, n_out + j) for j in range(a + 1))
                    continue
            else:
                kv_sum += len(r.prompt_token_ids) + n_out
                n_plain += 1
            f = tok[rid]
            sampled[rid] = (small[n_out] if f is None else f(n_out),)  # a decode: n_out >= 1
        if n_plain:  # what add_decode(kv_len, 1) adds, summed: kv_len + 1 pairs and KV tokens each
            shape.num_tokens += n_plain
            shape.num_seqs += n_plain
            shape.num_logits += n_plain
            shape.attn_pairs += kv_sum
            shape.kv_read_tokens += kv_sum
        self._copies(shape)
        if self._has_lora:
            lora_step(self, out, shape)
        dt = self.cost.step_time(shape)
        if spec is not None and spec.draft_cost is not None and self.draft is not None:
            dt += self.draft.cost(spec.draft_cost)  # the draft's k forwards run before the target's
        self._dt = dt
        now = self.clock = self.clock + dt
        if self.decisions is not None:
            self.decisions.append(decision_of(self.num_steps, out, self.index))
        self.num_steps += 1
        if rids:
            self.rec.itl.extend(map(now.__sub__, prev))
            last_tok.update(dict.fromkeys(rids, now))
        for r in ctx:
            if r.request_id in sampled:
                last_tok[r.request_id] = now
                self.reused += r.num_reused_tokens
                self.context_tokens += r.num_context_tokens
        return sampled

    def _copies(self, shape: StepShape) -> None:
        """Copies since the last step (this step's suspends, resumes, host-tier hits, offloads)."""
        sto = self.storage
        off, on = sto.d2h_blocks, sto.h2d_blocks
        if off != self._off or on != self._on:
            shape.d2h_bytes = (off - self._off) * self.block_bytes
            shape.h2d_bytes = (on - self._on) * self.block_bytes
            shape.copy_calls = sto.copy_calls - self._calls
            self._off, self._on, self._calls = off, on, sto.copy_calls
        dsto = self._draft_storage  # the draft cache's suspends and resumes move its blocks too
        doff, don = dsto.d2h_blocks, dsto.h2d_blocks
        if doff != self._doff or don != self._don:
            shape.d2h_bytes += (doff - self._doff) * dsto.bytes_per_block
            shape.h2d_bytes += (don - self._don) * dsto.bytes_per_block
            shape.copy_calls += dsto.copy_calls - self._dcalls
            self._doff, self._don, self._dcalls = doff, don, dsto.copy_calls

    def _settle(self, out: SchedulerOutput) -> None:
        """After the step update, as the engine's ``Speculator.settle``: the main cache gives back what
        the rejected drafts took (capacity -> history), the draft cache keeps what was validated."""
        kv = self.kv
        for rs in (out.context_requests, out.generation_requests):
            for req in rs:
                if kv.is_request_active(req.request_id):
                    kv.revert(req, kv.history(req))
        if self.draft is not None:
            self.draft.settle(out)

    def step(self) -> list[Request] | None:
        """Run one step at `clock`, or a decode window of several (sim/decode_window.py) that ends
        before `horizon`; None if the scheduler ran nothing (the caller decides how long to wait)."""
        batch = self._window
        if batch is not None:
            before = self.num_steps
            finished = run_window(self, batch, self.horizon)
            if finished is not None:
                self._publish_events(before)
                if finished:
                    self._done(finished, self.clock)
                return finished
        spec = self.spec
        if spec is not None:
            reserve_draft_slots(self.active, spec.k)
        out, finished = self.loop.step(self.active)
        self.stalled = finished is None
        if finished is None:
            return None
        if spec is not None:
            self._settle(out)
        now, kv, shape = self.clock, self.kv, self.shape
        self._publish_events(self.num_steps - 1)
        gen = out.generation_requests
        self.rec.step(
            now,
            self._dt,
            self._num_device - kv.num_free_device_blocks,
            self._num_host - kv.num_free_host_blocks,
            len(out.context_requests) + len(gen),
            shape.num_tokens,
            self.index,
        )
        self._window = None
        if self.decode_windows and not out.context_requests:
            self._window = eligible_batch(self, gen, len(self.active))
        if finished:
            self._done(finished, now)
        return finished

    def _publish_events(self, before: int) -> None:
        """After the steps since ``before``: hand the KV events to the router's feed, or, with nobody
        subscribed, drop them each time the step count passes a multiple of 256 (keeps the list bounded)."""
        if self.on_events is not None:
            events = self.kv.drain_events()
            if events:
                self.on_events(self.index, events)
        elif self._drain_events and self.num_steps >> 8 != before >> 8:
            self.kv.drain_events()

    def _done(self, finished: list[Request], now: float) -> None:
        """Record the requests finished in the step (or window) that ended at ``now``; drop them."""
        spec = self.spec
        for r in finished:
            rid = r.request_id
            del self.last_tok[rid]
            del self._tok[rid]
            del self._base[rid]
            if self.peft is not None:
                self.peft.release(r)  # as the engine does when a request finishes
            if spec is not None:
                spec.acceptance.forget(rid)
            self.preemptions += r.num_preemptions
            self.recomputed += r.num_recomputed_tokens
            self.rec.request_done(
                r.arrival_time, r.metrics["first_token"], now, r.prompt_len, len(r.output_token_ids),
                r.priority,
            )  # fmt: skip
        self.active = [r for r in self.active if not r.is_finished]
        if self._window is not None:  # the batch a window replays loses its finished requests too
            self._window = [r for r in self._window if not r.is_finished] or None
