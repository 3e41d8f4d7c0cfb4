"""The engine loop: schedule → forward → sample → step update → text, one call of :meth:`step` each.

The schedule → run → ``apply_step`` order is the core's :class:`~kvsched.core.loop.StepLoop`, shared
with the simulator; this module supplies the runner (model forward + sampler) and what surrounds a step
here: request intake, text and stop strings, metrics, KV events.

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

import itertools
import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from kvsched.core.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    KVSchedError,
    KVTransferError,
    SchedulerDeadlockError,
    UnknownRequestError,
    UnsupportedFeatureError,
)
from kvsched.core.kvcache import KVEvent
from kvsched.core.loop import StepLoop
from kvsched.core.protocols import Scheduler
from kvsched.core.request import Request, RequestState, SamplingParams
from kvsched.core.scheduler.draft_mirror import BothCaches
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.step import finish_request
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.logprobs import RowLogprobs, check_num_logprobs
from kvsched.engine.metrics import EngineStats
from kvsched.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepOutput
from kvsched.engine.overlap import OverlapLoop
from kvsched.engine.parts import EngineParts, build_engine_parts
from kvsched.engine.request_checks import check_cache_salt, check_priority, check_prompt
from kvsched.engine.sampler import Sampler, SampleResult
from kvsched.engine.speculative.speculator import Speculator
from kvsched.engine.step_profile import StepProfile
from kvsched.engine.text_stream import TextStream

log = logging.getLogger("kvsched.engine")


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one request (the Request itself is shared with scheduler and KV)."""

    req: Request
    external_id: Hashable
    prompt: str | None
    params: SamplingParams
    metrics: RequestMetrics
    stream: TextStream
    generator: torch.Generator | None
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    suspended: bool = False


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
        self._ids = itertools.count()
        self._tracked: dict[int, _Tracked] = {}
        self._by_external: dict[Hashable, int] = {}
        self._active: list[Request] = []
        self._finished: dict[Hashable, RequestOutput] = {}
        #: The rows and samples of the batch the runner just ran, read back by :meth:`step`.
        self._batch: tuple[list[Request], SampleResult, bool] | None = None
        #: What the scheduler chose in the step under way (None before it chose): a fault after it
        #: fails these requests only (:meth:`_contain`).
        self._scheduled: SchedulerOutput | None = None
        #: Speculative decoding (``EngineArgs.speculative``), or None.
        self.spec = self._make_speculator()
        draft_kv = self.parts.draft_kv
        #: What the step update advances and frees: with a draft cache, finishing frees both.
        self._step_kv = self.kv if draft_kv is None else BothCaches(self.kv, draft_kv)
        #: request id -> output length before this step (speculative steps append several tokens).
        self._before: dict[int, int] = {}
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
        params = sampling_params or SamplingParams()
        params.validate()
        check_num_logprobs(params.logprobs)
        priority = check_priority(priority)
        check_cache_salt(cache_salt)
        lora_id = self._resolve_lora(lora_id)
        internal = next(self._ids)
        external = internal if request_id is None else request_id
        while request_id is None and (external in self._by_external or external in self._finished):
            external = internal = next(self._ids)  # a caller-chosen id took this number
        if external in self._by_external or external in self._finished:
            raise DuplicateRequestError(f"request id {external!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._encode(external, prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(external, token_ids, params)
        eos = () if params.ignore_eos else self.parts.eos_token_ids
        req = Request(
            internal,
            token_ids,
            params.max_tokens,
            lora_id=lora_id,
            sampling_params=params,
            eos_token_ids=eos,
            arrival_time=arrival_time,
            priority=priority,
            cache_salt=cache_salt,
        )
        gen = None if params.seed is None else Sampler.make_generator(params.seed, self.parts.device)
        self._tracked[internal] = _Tracked(
            req=req,
            external_id=external,
            prompt=text,
            params=params,
            metrics=RequestMetrics(arrival_time=req.arrival_time),
            stream=TextStream(self.parts.tokenizer, token_ids, params.stop),
            generator=gen,
            logprobs=[] if params.logprobs is not None else None,
            top_logprobs=[] if params.logprobs is not None else None,
        )
        self._by_external[external] = internal
        self._active.append(req)
        return external

    def _resolve_lora(self, lora: int | str | None) -> int | None:
        """A request's adapter (id or name) -> its id, checked against the loaded adapters and the budget."""
        if lora is None:
            return None
        registry, peft = self.parts.lora, self.parts.peft_cache
        if registry is None or peft is None:
            raise UnsupportedFeatureError(f"lora_id={lora!r}: this engine has no LoRA adapters loaded")
        lora_id = registry.resolve(lora)
        assert lora_id is not None
        registry.check_fits(lora_id, peft.max_device_pages)
        return lora_id

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

    def _encode(self, rid: Hashable, prompt: str) -> list[int]:
        """Tokenize a text prompt; a tokenizer that raises is this request's InvalidRequestError."""
        try:
            return self.parts.encode(prompt)
        except KVSchedError:
            raise
        except Exception as exc:
            raise InvalidRequestError(
                f"request {rid!r}: the tokenizer failed on the prompt: {type(exc).__name__}: {exc}"
            ) from exc

    def _check_prompt(self, rid: Hashable, token_ids: list[int], params: SamplingParams) -> None:
        check_prompt(
            token_ids,
            params.max_tokens,
            vocab_size=self.parts.vocab_size,
            max_model_len=self.max_model_len,
            tokens_per_block=self.kv.tokens_per_block,
            num_device_blocks=self.kv.num_device_blocks,
            request_id=rid,
        )

    def abort_request(self, request_id: Hashable) -> None:
        """Stop a request now and free its KV; its result (finish_reason "abort") stays collectable."""
        internal = self._by_external.get(request_id)
        if internal is None:
            raise UnknownRequestError(f"unknown request id {request_id!r} (never added, or finished)")
        tracked = self._tracked[internal]
        if self._overlap is not None:
            self._overlap.forget(tracked.req)  # its token in flight is dropped
        finish_request(tracked.req, "abort", self._step_kv, now=time.monotonic())
        self._retire(tracked)
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
            return self._finished.pop(request_id)
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
        if self.spec is not None:
            return self._speculative_outputs(out, finished)
        assert self._batch is not None  # set by _run_batch, which ran since the scheduler ran something
        rows, result, want_lp = self._batch
        self._batch = None
        now = self.loop.now
        self.stats.record_step(out, len(result.token_ids), self.kv)
        outputs = []
        for i, (req, tok) in enumerate(zip(rows, result.token_ids)):
            tracked = self._tracked[req.request_id]
            top = result.top_logprobs[i] if want_lp and result.top_logprobs is not None else None
            outputs.append(self._emit(tracked, tok, result.logprobs[i] if want_lp else None, now, top))
        if self.profile is not None:
            self.profile.lap("detokenize")
        if finished or any(o.finished for o in outputs):
            self._active = [r for r in self._active if r.state != RequestState.GENERATION_COMPLETE]
        self._publish_kv_events()
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
        if self.spec is not None:
            return self._run_speculative(out)
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

    # -- speculative decoding (engine/speculative/) ----------------------------------------------
    def _make_speculator(self) -> Speculator | None:
        args = self.args
        if args.speculative is None:
            return None
        from kvsched.engine.speculative import DraftModelProposer, NgramProposer, Proposer

        proposer: Proposer
        if args.speculative == "ngram":
            proposer = NgramProposer()
        else:
            parts = self.parts
            assert parts.draft_model is not None and parts.draft_storage is not None
            assert parts.draft_kv is not None
            proposer = DraftModelProposer(parts.draft_model, parts.draft_storage, parts.draft_kv)
        return Speculator(
            proposer, args.num_speculative_tokens, self.parts.runner, self.kv, self.sampler, self._params_of
        )

    def _params_of(self, req: Request) -> tuple[SamplingParams, torch.Generator | None]:
        t = self._tracked[req.request_id]
        return t.params, t.generator

    def _run_speculative(self, out: SchedulerOutput) -> dict[int, list[int]]:
        """The loop's runner with speculation: propose, verify in one target forward."""
        assert self.spec is not None
        tracked = self._tracked
        self._before = {
            r.request_id: len(r.output_token_ids)
            for rs in (out.context_requests, out.generation_requests)
            for r in rs
        }
        return self.spec.run(out, lambda r: tracked[r.request_id].params.logprobs)

    def _speculative_outputs(self, out: SchedulerOutput, finished: list[Request]) -> list[StepOutput]:
        """Rewind both caches to the accepted tokens, then emit each request's new tokens."""
        spec = self.spec
        assert spec is not None
        spec.settle(out)
        now = self.loop.now
        proposed = spec.counts.proposed
        outputs = []
        produced = 0
        for req in itertools.chain(out.context_requests, out.generation_requests):
            before = self._before.get(req.request_id)
            if before is None or len(req.output_token_ids) == before:
                continue  # a context chunk that is not the last
            tracked = self._tracked[req.request_id]
            new = req.output_token_ids[before:]
            produced += len(new)
            k = proposed.get(req.request_id, 0)
            if k:
                m = tracked.metrics
                m.num_speculative_steps += 1
                m.num_draft_tokens += k
                m.num_accepted_draft_tokens += len(new) - 1
                self.stats.record_speculation(k, len(new) - 1)
            outputs.append(self._emit_many(tracked, before, new, spec.logprobs.get(req.request_id), now))
        self.stats.record_step(out, produced, self.kv)
        if finished or any(o.finished for o in outputs):
            self._active = [r for r in self._active if r.state != RequestState.GENERATION_COMPLETE]
        self._publish_kv_events()
        return outputs

    def _emit_many(
        self, tracked: _Tracked, before: int, tokens: list[int], lps: RowLogprobs | None, now: float
    ) -> StepOutput:
        """Emit several tokens of one step, token by token through the text stream: a stop string
        inside them ends the output there (the tokens after it are dropped, as without speculation)."""
        req = tracked.req
        delta_all, emitted = "", 0
        for j, tok in enumerate(tokens):
            last = j == len(tokens) - 1
            emitted += 1
            delta, stopped = tracked.stream.push([tok], final=req.is_finished and last)
            delta_all += delta
            if stopped:
                if not req.is_finished:
                    finish_request(req, "stop", self._step_kv, now=now)
                req.finish_reason = "stop"
                del req.output_token_ids[before + emitted :]
                break
        kept = tokens[:emitted]
        sampled = top = None
        if lps is not None:
            sampled, top = lps.sampled[:emitted], lps.top[:emitted]
            if tracked.logprobs is not None:
                tracked.logprobs.extend(sampled)
            if tracked.top_logprobs is not None:
                tracked.top_logprobs.extend(top)
        if req.is_finished:
            self._retire(tracked)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=kept,
            text_delta=delta_all,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            logprobs=sampled,
            top_logprobs=top,
        )

    # -- faults --------------------------------------------------------------------------------------
    def _contain(self, exc: Exception) -> list[StepOutput]:
        """A fault inside a step fails the requests it touched, not the engine; anything else re-raises.

        A failed KV copy (:class:`KVTransferError`: nothing moved, no slot lost) fails the request whose
        suspend or resume needed it. An exception once the step was scheduled (forward pass, sampler,
        step update) fails that step's requests. Their KV is freed; the rest are served from the next step.
        """
        self._batch = None
        scheduled, self._scheduled = self._scheduled, None
        if isinstance(exc, KVTransferError) and exc.request_id in self._tracked:
            victims = [self._tracked[exc.request_id]]
            message = f"the engine failed this request: {exc}"
        elif scheduled is not None:
            reqs = itertools.chain(scheduled.context_requests, scheduled.generation_requests)
            victims = [self._tracked[r.request_id] for r in reqs if r.request_id in self._tracked]
            message = f"the engine failed this request: its step raised {type(exc).__name__}: {exc}"
        else:
            raise exc
        log.warning("%s (%d request(s) failed)", message, len(victims), exc_info=exc)
        outputs = [self._fail(t, message) for t in victims]
        self._active = [r for r in self._active if r.state != RequestState.GENERATION_COMPLETE]
        self._publish_kv_events()
        return outputs

    def _fail(self, tracked: _Tracked, message: str) -> StepOutput:
        """End one request with finish_reason "error" and free its KV; ``message`` says why."""
        req = tracked.req
        if req.is_finished:  # finished by the step update before the fault: its KV is already freed
            req.finish_reason = "error"
        else:
            finish_request(req, "error", self._step_kv, now=time.monotonic())
        self._retire(tracked, error=message)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=[],
            text_delta="",
            finished=True,
            finish_reason="error",
            error=message,
        )

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
        for req in out.paused_requests:
            tracked = self._tracked[req.request_id]
            tracked.metrics.num_suspends += 1
            tracked.suspended = True
        for req in out.preempted_requests:
            self._tracked[req.request_id].metrics.num_preemptions += 1
        for req in itertools.chain(out.context_requests, out.generation_requests):
            m = self._tracked[req.request_id]
            if m.suspended:
                m.suspended = False
                m.metrics.num_resumes += 1
            if m.metrics.first_scheduled_time is None:
                m.metrics.first_scheduled_time = now
            if req.num_reused_tokens > m.metrics.num_reused_tokens:
                m.metrics.num_reused_tokens = req.num_reused_tokens

    def _emit(
        self,
        tracked: _Tracked,
        token: int,
        logprob: float | None,
        now: float,
        top: dict[int, float] | None = None,
    ) -> StepOutput:
        req = tracked.req
        if tracked.logprobs is not None and logprob is not None:
            tracked.logprobs.append(logprob)
        if tracked.top_logprobs is not None and top is not None:
            tracked.top_logprobs.append(top)
        try:
            delta, stopped = tracked.stream.push([token], final=req.is_finished)
        except Exception as exc:  # a detokenizer fault fails this request alone
            return self._fail(
                tracked,
                f"the engine failed this request: detokenizing its output raised {type(exc).__name__}: {exc}",
            )
        if stopped:  # a stop string: the text stream is its one owner
            if req.is_finished:
                req.finish_reason = "stop"  # it ends the text, so it names the reason (as in vLLM)
            else:
                finish_request(req, "stop", self._step_kv, now=now)
        if req.is_finished:
            self._retire(tracked)
        return StepOutput(
            request_id=tracked.external_id,
            new_token_ids=[token],
            text_delta=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            logprobs=None if logprob is None else [logprob],
            top_logprobs=None if top is None or tracked.top_logprobs is None else [top],
        )

    def _retire(self, tracked: _Tracked, error: str | None = None) -> None:
        req = tracked.req
        if self.parts.peft_cache is not None:
            self.parts.peft_cache.release(req)  # a finished request no longer pins its adapter
        m = tracked.metrics
        m.read_times(req)  # first/last token and finish: recorded once, by apply_step / finish_request
        m.num_preemptions = max(m.num_preemptions, req.num_preemptions)
        m.num_recomputed_tokens = req.num_recomputed_tokens
        self.stats.record_finish(req)
        del self._tracked[req.request_id]
        del self._by_external[tracked.external_id]
        self._finished[tracked.external_id] = RequestOutput(
            request_id=tracked.external_id,
            prompt=tracked.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=tracked.stream.text,
                    token_ids=list(req.output_token_ids),
                    finish_reason=req.finish_reason,
                    logprobs=tracked.logprobs,
                    top_logprobs=tracked.top_logprobs,
                )
            ],
            finished=True,
            metrics=m,
            num_cached_tokens=m.num_reused_tokens,
            error=error,
        )
