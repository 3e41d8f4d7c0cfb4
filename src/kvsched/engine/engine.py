"""The engine loop: schedule → forward → sample → step update → text, one call of :meth:`step` each.

The schedule → run → ``apply_step`` order is the core's :class:`~kvsched.core.loop.StepLoop`, shared
with the simulator; this module supplies the runner (model forward + sampler) and what surrounds a step
here: metrics and KV events, with request intake in ``intake.py``, text and stop strings in
``request_book.py``, speculative steps in ``spec_step.py`` and step faults in ``step_faults.py``.

The scheduler allocates KV and may suspend requests to the host tier (``paused_requests``); the
engine leaves those alone (no reset, no recompute) and counts them. Requests with bad input are
rejected in :meth:`add_request` with a typed error before they touch any shared state, so they fail
alone while the others keep running.

Priority: ``add_request(..., priority=p)`` sets ``Request.priority``; **higher = more important**
(vLLM's ``priority`` is the other way round: lower = earlier). It orders the scheduler's pass only with
``EngineArgs.priority_mode=True``; the KV manager always evicts cached blocks of lower priority first.

KV events (blocks stored / removed per tier, for a KV-aware router): :meth:`Engine.drain_kv_events`
takes what the KV manager built since the last call; or pass ``on_kv_events`` and the loop hands them
over after every step that produced some.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Sequence

from kvsched.core.errors import SchedulerDeadlockError, UnknownRequestError
from kvsched.core.kvcache import KVEvent
from kvsched.core.loop import StepLoop
from kvsched.core.protocols import Scheduler
from kvsched.core.request import Request, RequestState, SamplingParams
from kvsched.core.scheduler.draft_mirror import BothCaches
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.step import finish_request
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.intake import Intake
from kvsched.engine.metrics import EngineStats
from kvsched.engine.outputs import RequestOutput, StepOutput
from kvsched.engine.overlap import OverlapLoop
from kvsched.engine.parts import EngineParts, build_engine_parts
from kvsched.engine.request_book import RequestBook
from kvsched.engine.sampler import Sampler, SampleResult
from kvsched.engine.spec_step import SpeculativeStep, make_speculator
from kvsched.engine.step_faults import fail_requests, victims_of
from kvsched.engine.step_profile import StepProfile

__all__ = ["Engine"]


class Engine:
    """The engine loop: serves requests step by step over its :class:`EngineParts` and a sampler.

    ``kvsched.engine.Executor`` is an alias of this class, kept for code written before the rename.
    """

    def __init__(
        self,
        args: EngineArgs | None = None,
        parts: EngineParts | None = None,
        *,
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
    ) -> None:
        self.args = args or EngineArgs()
        #: Called after each step with the KV events of that step (never with an empty list); it runs
        #: on the engine thread, so it must be quick (hand the events to a queue).
        self.on_kv_events = on_kv_events
        self.parts = parts or build_engine_parts(self.args)
        self.tokenizer = self.parts.tokenizer
        self.kv = self.parts.kv
        self.max_model_len = self.parts.max_model_len
        self.sampler = Sampler(self.args.seed, self.parts.device)
        self.stats = EngineStats()
        self._active: list[Request] = []
        #: The rows and samples of the batch the runner just ran, read back by :meth:`step`.
        self._batch: tuple[list[Request], SampleResult, bool] | None = None
        #: What the scheduler chose in the step under way (None before it chose): a fault after it
        #: fails these requests only (:meth:`_contain`).
        self._scheduled: SchedulerOutput | None = None
        draft_kv = self.parts.draft_kv
        #: What the step update advances and frees: with a draft cache, finishing frees both.
        self._step_kv = self.kv if draft_kv is None else BothCaches(self.kv, draft_kv)
        #: The requests (engine/request_book.py): emits their tokens, fails and retires them.
        self.book = RequestBook(self._step_kv, self.stats, self.parts.peft_cache)
        self._tracked = self.book.tracked
        #: Speculative decoding (``EngineArgs.speculative``), or None.
        self.spec = make_speculator(self.args, self.parts, self.sampler, self.book.params_of)
        self._intake = Intake(self.parts, self.book)
        self._spec_step = None if self.spec is None else SpeculativeStep(self.spec, self.book, self.kv)
        self.loop = StepLoop(
            self.parts.scheduler,
            self._step_kv,
            self._run_batch,
            time.monotonic,
            on_schedule=self._note_schedule,
        )
        #: ``EngineArgs.async_scheduling``: the forward runs in a worker thread beside scheduling and
        #: text (engine/overlap.py); speculative decoding and LoRA engines keep the synchronous loop.
        self._overlap = (
            OverlapLoop(self)
            if self.args.async_scheduling and self.spec is None and self.parts.lora is None
            else None
        )
        #: ``EngineArgs.profile_steps``: time per phase of each synchronous step (engine/step_profile.py).
        self.profile = StepProfile() if self.args.profile_steps else None
        self.parts.model.profile = self.parts.runner.profile = self.profile

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler the loop drives (replace it through ``loop.scheduler``)."""
        return self.loop.scheduler

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: Hashable | None = None,
        lora_id: int | str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: int | None = None,
    ) -> Hashable:
        """Queue one request; returns its id. Raises InvalidRequestError / DuplicateRequestError.

        ``priority``: higher is more important (scheduled first in priority mode, its cached blocks
        evicted last); the default 0 for every request keeps arrival order. ``cache_salt``: the
        request's prefix-reuse scope; requests with different salts never share cached blocks.
        ``lora_id``: a loaded LoRA adapter, by id or by name (``EngineArgs.lora_modules``); its cached
        blocks are shared only with requests of the same adapter.
        """
        tracked = self._intake.admit(
            prompt, sampling_params, request_id, lora_id, arrival_time, priority, cache_salt
        )
        self._active.append(tracked.req)
        return tracked.external_id

    @property
    def lora_names(self) -> dict[str, int]:
        """Loaded LoRA adapters: name -> id (empty without adapters)."""
        return {} if self.parts.lora is None else dict(self.parts.lora.ids)

    def load_lora_adapter(self, name: str, path: str | os.PathLike[str]) -> int:
        """Load an HF PEFT adapter while serving (the engine must be built with ``lora_modules`` or
        ``enable_lora``); returns its id. Call between steps, on the engine's thread."""
        from kvsched.engine.lora.runtime import load_lora_adapter

        return load_lora_adapter(self.parts, name, path)

    def unload_lora_adapter(self, name: str) -> int:
        """Unload an adapter no unfinished request uses (else AdapterInUseError); returns its old id."""
        from kvsched.engine.lora.runtime import unload_lora_adapter

        return unload_lora_adapter(self.parts, name, self._active)

    def abort_request(self, request_id: Hashable) -> None:
        """Stop a request now and free its KV; its result (finish_reason "abort") stays collectable."""
        internal = self.book.by_external.get(request_id)
        if internal is None:
            raise UnknownRequestError(f"unknown request id {request_id!r} (never added, or finished)")
        tracked = self._tracked[internal]
        if self._overlap is not None:
            self._overlap.forget(tracked.req)  # its token in flight is dropped
        finish_request(tracked.req, "abort", self._step_kv, now=time.monotonic())
        self.book.retire(tracked)
        self._active = [r for r in self._active if r.request_id != internal]

    def has_unfinished_requests(self) -> bool:
        return bool(self._active)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._active)

    def drain_kv_events(self) -> list[KVEvent]:
        """KV events since the last drain (oldest first); a consumer that polls instead of passing
        ``on_kv_events``. Each event: ``kind`` "stored" | "removed", ``block_hash``, ``tier``,
        ``parent_hash`` (see docs/design.md)."""
        return self.kv.drain_events()

    def get_stats(self) -> EngineStats:
        """Engine counters with a fresh snapshot of the KV manager's (tiers, reuse, suspends)."""
        return self.stats.snapshot(self.kv)

    def pop_output(self, request_id: Hashable) -> RequestOutput:
        """The result of a finished request (each can be taken once)."""
        try:
            return self.book.finished.pop(request_id)
        except KeyError:
            raise UnknownRequestError(f"no finished request with id {request_id!r}") from None

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one scheduling step; returns the new tokens/text of each request that advanced."""
        if not self._active:
            return []
        if self._overlap is not None:
            return self._overlap.step()
        if self.spec is not None:
            self.spec.reserve(self._active)
        self._scheduled = None
        if self.profile is not None:
            self.profile.begin()
        try:
            out, finished = self.loop.step(self._active)
        except Exception as exc:
            return self._contain(exc)
        self._scheduled = None
        if self.profile is not None:
            self.profile.after_update(ran=finished is not None)
        if finished is None:
            return self._idle(out)
        if self._spec_step is not None:
            outputs = self._spec_step.outputs(out, self.loop.now)
            self._end_step(finished, outputs)
            return outputs
        assert self._batch is not None  # set by _run_batch, which ran since the scheduler ran something
        rows, result, want_lp = self._batch
        self._batch = None
        now = self.loop.now
        self.stats.record_step(out, len(result.token_ids), self.kv)
        outputs = []
        emit, tracked_of = self.book.emit, self._tracked
        for i, (req, tok) in enumerate(zip(rows, result.token_ids)):
            top = result.top_logprobs[i] if want_lp and result.top_logprobs is not None else None
            outputs.append(
                emit(tracked_of[req.request_id], tok, result.logprobs[i] if want_lp else None, now, top)
            )
        if self.profile is not None:
            self.profile.lap("detokenize")
        self._end_step(finished, outputs)
        if self.profile is not None:
            self.profile.end()
        return outputs

    def run(self) -> list[RequestOutput]:
        """Step until every request finishes; returns the finished results in completion order."""
        done: list[RequestOutput] = []
        while self._active:
            for o in self.step():
                if o.finished:
                    done.append(self.pop_output(o.request_id))
        return done

    # -- helpers ---------------------------------------------------------------------------------
    def _end_step(self, finished: list[Request], outputs: list[StepOutput]) -> None:
        """After a step's outputs (also a contained fault's, engine/overlap.py's too): drop the finished
        from the active list, publish the KV events."""
        if finished or any(o.finished for o in outputs):
            self._active = [r for r in self._active if r.state != RequestState.GENERATION_COMPLETE]
        self._publish_kv_events()

    def _idle(self, out: SchedulerOutput | None) -> list[StepOutput]:
        """A step that ran nothing (also with async scheduling): suspends freed KV, so the next step
        can progress; with nothing suspended or preempted the scheduler is stuck."""
        if out is not None and (out.paused_requests or out.preempted_requests):
            self._publish_kv_events()  # suspends moved blocks between tiers
            return []
        raise SchedulerDeadlockError(
            f"nothing could be scheduled for {len(self._active)} unfinished requests "
            f"(free device blocks: {self.kv.num_free_device_blocks})"
        )

    def _run_batch(self, out: SchedulerOutput) -> dict[int, list[int]]:
        """The loop's runner: one forward pass and one sampled token per logits row."""
        if self._spec_step is not None:
            return self._spec_step.run(out)
        rows, logits = self.parts.runner.run(out, self.kv)  # profiled: laps batch_build and forward
        sample_rows = [self._tracked[r.request_id] for r in rows]
        want_lp = any(t.logprobs is not None for t in sample_rows)
        result = self.sampler(
            logits, [t.params for t in sample_rows], [t.generator for t in sample_rows], want_lp
        )
        if self.profile is not None:
            self.profile.lap("sampling")
        self._batch = (rows, result, want_lp)
        return {r.request_id: [tok] for r, tok in zip(rows, result.token_ids)}

    def _contain(self, exc: Exception) -> list[StepOutput]:
        """A fault inside a step fails the requests it touched, not the engine; anything else re-raises
        (engine/step_faults.py says which). Their KV is freed; the rest are served from the next step."""
        self._batch = None
        scheduled, self._scheduled = self._scheduled, None
        hit = victims_of(exc, scheduled, self.book)
        if hit is None:
            raise exc
        outputs = fail_requests(self.book, hit[0], hit[1], exc)
        self._end_step([], outputs)
        return outputs

    def _publish_kv_events(self) -> None:
        if self.on_kv_events is not None:
            events = self.kv.drain_events()
            if events:
                self.on_kv_events(events)

    def _note_schedule(self, out: SchedulerOutput) -> None:
        """The loop's ``on_schedule`` hook: suspend / resume / preemption counts, first scheduled time."""
        if self.profile is not None:
            self.profile.lap("scheduling")
        now = time.monotonic()
        self._scheduled = out
        self.stats.record_schedule(out)
        self.book.note_schedule(out, now)
