"""Async scheduling (``EngineArgs.async_scheduling``): everything but the forward runs beside it.

The synchronous loop is schedule(N) → forward(N) → sample(N) → step update(N) → text(N), one after
the other. Here the forward and the sampler of a step run in one worker thread (torch releases the GIL
inside its ops), while the engine thread emits the text of the step before and schedules the one after,
as TensorRT-LLM's overlap scheduler (``PyExecutor._executor_loop_overlap``) and vLLM's async scheduling
(``async_scheduling``) do with a CUDA stream:

* Step N+1 is scheduled before step N's tokens are known, assuming every request of step N produced
  one token: step N's update is applied at submission with a placeholder token per row, so the
  scheduler sees the positions, states and KV lengths it will have (a ``max_tokens`` end is known
  then). The in-flight requests stay schedulable: the core's ``inflight_request_ids`` would skip them,
  halving every request's decode rate.
* The forward of N+1 takes each placeholder input from step N's sampled tokens in the worker, where
  step N has already finished (one worker runs the steps in order, as one CUDA stream would).
* When step N's tokens arrive they replace the placeholders; EOS, stop token ids and stop strings
  (the text stream) found then end the request late: it leaves step N+1 before that step's update,
  so its extra token is dropped and its KV is freed exactly as the synchronous loop frees it.
* KV copies (suspend, resume, host-tier prefix hits) wait for the forward in flight
  (:meth:`OverlapLoop.fence`): a copy must not read blocks the forward is writing, nor fill freed
  blocks it still writes. A step that copies therefore runs without overlap.

Greedy and per-request-seeded outputs are identical with overlap on and off; unseeded random
sampling draws from the engine-wide generator in batch order, so it already depends on the batch.
Speculative decoding and LoRA engines keep the synchronous loop (the engine never builds this).
A fault in a step fails every request of the steps in flight.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvsched.core.errors import KVTransferError
from kvsched.core.request import Request, RequestState
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.step import finish_request, token_stop
from kvsched.engine.forward_batch import ForwardBatch
from kvsched.engine.outputs import StepOutput
from kvsched.engine.sampler import SampleResult
from kvsched.engine.step_faults import fail_requests, step_failed_message, victims_of

if TYPE_CHECKING:
    from kvsched.engine.engine import Engine

__all__ = ["PLACEHOLDER", "OverlapLoop"]

#: The token a step's update appends before the real one is known; never a valid id, so a forward
#: that was not given the real token fails loudly (embedding index) instead of computing garbage.
PLACEHOLDER = -1
_DONE = RequestState.GENERATION_COMPLETE
_SCHEDULABLE = (RequestState.CONTEXT_INIT, RequestState.GENERATION_IN_PROGRESS)


@dataclass(slots=True)
class _InFlight:
    """One submitted step: what was scheduled, its logits rows and the worker's future."""

    out: SchedulerOutput
    rows: list[Request]
    result: Future[SampleResult]
    want_logprobs: bool
    #: request id -> (index of its placeholder in ``output_token_ids``, its sample row).
    unknown: dict[int, tuple[int, int]]
    #: Requests whose first token is this step's: their first-token time is stamped when it is known.
    first: list[Request]


class OverlapLoop:
    """The engine's :meth:`~kvsched.engine.engine.Engine.step` with the forward in a worker thread.

    Each :meth:`step` schedules and submits step N+1, then emits step N's outputs (so the first call
    returns nothing, and a request's last token comes one call after its step ran).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inflight: _InFlight | None = None
        #: The last future handed to the worker (the fence waits for it: the worker runs in order).
        self._last: Future[SampleResult] | None = None
        threads = torch.get_num_threads()  # a new thread does not inherit torch.set_num_threads
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix="kvsched-forward", initializer=torch.set_num_threads, initargs=(threads,)
        )
        # The KV manager moves every block through its storage's copy_blocks, which calls this hook
        # first: a copy waits for the forward in flight.
        engine.parts.storage.before_copy = self.fence

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        eng = self.engine
        prev = self._inflight  # stays visible to forget() until its tokens are emitted
        eng._scheduled = None
        out, failed = self._schedule()
        cur: _InFlight | None = None
        try:
            if out is not None and (out.context_requests or out.generation_requests):
                cur = self._submit(out, prev)
            outputs = failed + self._finish(prev) if prev is not None else failed
            # Drop the finished now, before _apply: the requests its update ends (max_tokens, known at
            # submission) must stay active until their token is emitted next call (Engine._end_step at
            # the end of the step would drop them too early).
            if any(o.finished for o in outputs):
                eng._active = [r for r in eng._active if r.state != _DONE]
            if prev is None and cur is None and not failed:
                return eng._idle(out)  # nothing in flight and nothing scheduled
            if cur is not None:
                self._apply(cur)
            self._inflight = cur
        except Exception as exc:
            return self._fault(exc, prev, cur)
        eng._scheduled = None
        eng._publish_kv_events()
        return outputs

    def _schedule(self) -> tuple[SchedulerOutput | None, list[StepOutput]]:
        """The scheduler's pass over the state step N's update left. A failed KV copy fails its request
        alone (as in the synchronous loop); any other error leaves the step in flight and re-raises."""
        eng = self.engine
        if not any(r.state in _SCHEDULABLE for r in eng._active):
            return None, []
        try:
            return eng.loop.schedule(eng._active), []
        except KVTransferError as exc:
            hit = victims_of(exc, None, eng.book)  # the request being moved, as in the synchronous loop
            if hit is None:
                raise
            eng._scheduled = None
            for tracked in hit[0]:
                self.forget(tracked.req)
            return None, fail_requests(eng.book, hit[0], hit[1], exc)

    def _submit(self, out: SchedulerOutput, prev: _InFlight | None) -> _InFlight:
        """Build step N+1's batch on this thread and hand its forward and sampling to the worker."""
        eng = self.engine
        runner = eng.parts.runner
        batch, rows = runner.build_batch(out, eng.kv)
        assert batch is not None  # the scheduler ran something
        patch_rows, patch_src = self._patches(out, batch, prev)
        tracked = [eng._tracked[r.request_id] for r in rows]
        want_lp = any(t.logprobs is not None for t in tracked)
        params = [t.params for t in tracked]
        gens = [t.generator for t in tracked]
        before = None if prev is None else prev.result
        model, storage, sampler = runner.model, runner.storage, eng.sampler

        def forward() -> SampleResult:
            if patch_rows:
                assert before is not None  # a placeholder comes from the step before
                known = before.result().token_ids  # done: the worker ran that step first
                ids = batch.input_ids
                ids[torch.tensor(patch_rows, device=ids.device)] = torch.tensor(
                    [known[j] for j in patch_src], dtype=ids.dtype, device=ids.device
                )
            return sampler(model(batch, storage), params, gens, want_lp)

        first = [
            r for r in out.context_requests if r.is_last_context_chunk and "first_token" not in r.metrics
        ]
        fut = self._last = self._worker.submit(forward)
        return _InFlight(out, rows, fut, want_lp, {}, first)

    @staticmethod
    def _patches(
        out: SchedulerOutput, batch: ForwardBatch, prev: _InFlight | None
    ) -> tuple[list[int], list[int]]:
        """Rows of ``batch.input_ids`` that hold a placeholder, and the sample row of ``prev`` for each.

        Only the newest token of a request can be unknown; a decode feeds it, and so may a recompute
        context (prompt + outputs) whose chunk reaches the end.
        """
        rows: list[int] = []
        src: list[int] = []
        if prev is None or not prev.unknown:
            return rows, src
        unknown = prev.unknown
        start_row = 0
        seqs = itertools.chain(out.context_requests, out.generation_requests)
        for req, n in zip(seqs, batch.query_lens_host):
            hit = unknown.get(req.request_id)
            if hit is not None:
                pos = req.prompt_len + hit[0]
                first = (
                    req.context_current_position
                    if req.state == RequestState.CONTEXT_INIT
                    else req.num_tokens - 1
                )
                if first <= pos < first + n:
                    rows.append(start_row + pos - first)
                    src.append(hit[1])
            start_row += n
        return rows, src

    def _apply(self, cur: _InFlight) -> None:
        """Step N+1's update with a placeholder per row, minus the requests that ended meanwhile."""
        out = cur.out
        if any(r.state == _DONE for r in itertools.chain(out.context_requests, out.generation_requests)):
            out = SchedulerOutput(
                [r for r in out.context_requests if r.state != _DONE],
                [r for r in out.generation_requests if r.state != _DONE],
                out.paused_requests,
                out.preempted_requests,
                out.num_scheduled_tokens,
            )
        live = [(j, r) for j, r in enumerate(cur.rows) if r.state != _DONE]
        placeholder = [PLACEHOLDER]
        eng = self.engine
        eng.stats.record_step(out, 0, eng.kv)  # chunk sizes and KV usage as scheduled; tokens at emission
        eng.loop.apply(out, {r.request_id: placeholder for _, r in live})
        cur.unknown = {r.request_id: (len(r.output_token_ids) - 1, j) for j, r in live}

    def _finish(self, prev: _InFlight) -> list[StepOutput]:
        """Step N's real tokens: replace the placeholders, end requests on late stops, emit text."""
        eng = self.engine
        result = prev.result.result()
        now = eng.loop.clock()
        for r in prev.first:
            if r.request_id in prev.unknown:
                r.metrics["first_token"] = now
        outputs = []
        want_lp, tops = prev.want_logprobs, result.top_logprobs
        emit, tracked_of, kv = eng.book.emit, eng._tracked, eng._step_kv
        produced = 0
        for j, (req, tok) in enumerate(zip(prev.rows, result.token_ids)):
            hit = prev.unknown.get(req.request_id)
            tracked = tracked_of.get(req.request_id)
            if hit is None or tracked is None:
                continue  # aborted or failed while its step ran: the token is dropped
            req.output_token_ids[hit[0]] = tok
            metrics = req.metrics
            metrics["last_token"] = now
            if token_stop(req, tok):
                if req.state == _DONE:
                    req.finish_reason = "stop"  # EOS on the last allowed token: as apply_step says
                    metrics["finished"] = now
                else:
                    finish_request(req, "stop", kv, now=now)
            elif req.state == _DONE:
                metrics["finished"] = now  # the max_tokens end, known at submission
            produced += 1
            lp = result.logprobs[j] if want_lp and result.logprobs is not None else None
            top = tops[j] if want_lp and tops is not None else None
            outputs.append(emit(tracked, tok, lp, now, top))
        prev.unknown.clear()
        eng.stats.num_generated_tokens += produced
        return outputs

    # -- around the step ---------------------------------------------------------------------------
    def fence(self) -> None:
        """Wait until the worker has run every submitted forward (before any KV block copy)."""
        last = self._last
        if last is not None and not last.done():
            wait_futures([last])

    def forget(self, req: Request) -> None:
        """``req`` ends outside a step (abort): drop its unknown token, so its output holds known ones."""
        cur = self._inflight
        hit = None if cur is None else cur.unknown.pop(req.request_id, None)
        if hit is not None:
            del req.output_token_ids[hit[0] :]
            if req.state == _DONE:
                req.finish_reason = "abort"  # it reached max_tokens, but that token never came

    def _fault(self, exc: Exception, *steps: _InFlight | None) -> list[StepOutput]:
        """A step raised: the requests of the steps in flight (and the one just scheduled) fail, each
        keeping the tokens already known; a fault before anything was scheduled re-raises."""
        eng = self.engine
        self.fence()
        self._inflight = None
        victims: dict[int, None] = {}
        for s in steps:
            if s is None:
                continue
            for r in s.rows:
                hit = s.unknown.pop(r.request_id, None)
                if hit is not None:
                    del r.output_token_ids[hit[0] :]
            for r in itertools.chain(s.out.context_requests, s.out.generation_requests):
                victims[r.request_id] = None
        scheduled, eng._scheduled = eng._scheduled, None
        if scheduled is not None:
            for r in itertools.chain(scheduled.context_requests, scheduled.generation_requests):
                victims[r.request_id] = None
        failed = [eng._tracked[rid] for rid in victims if rid in eng._tracked]
        if not failed:
            raise exc
        outputs = fail_requests(eng.book, failed, step_failed_message(exc), exc)
        eng._end_step([], outputs)
        return outputs
