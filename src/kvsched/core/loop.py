"""The one step loop shared by the engine and the simulator: schedule → run the batch → step update.

Both sides drive the same scheduler and KV manager; what differs is only how a batch is run (a model
forward and a sampler, or the cost model over a virtual clock) and what is done around a step (text
and stop strings, metrics, KV events). Those stay with the callers; the order of the three calls lives
here once, so the engine and the simulator cannot drift apart (tests/sim/test_engine_sim_identity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvsched.core.protocols import Scheduler, StepKV, StepRunner
from kvsched.core.request import Request
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.core.step import apply_step

__all__ = ["StepLoop"]


@dataclass(slots=True)
class StepLoop:
    """One engine iteration per :meth:`step` over a scheduler, a runner and the KV manager.

    ``runner(output)`` executes the scheduled batch and returns the tokens of each request id;
    ``clock()`` is read once the batch ran, and stamps the step update (first / last token, finish).
    ``on_schedule(output)``, when given, sees every scheduling decision before the batch runs (also
    one that runs nothing), e.g. to count suspends or note when a request was first scheduled.
    """

    scheduler: Scheduler
    kv: StepKV
    runner: StepRunner
    clock: Callable[[], float]
    on_schedule: Callable[[SchedulerOutput], None] | None = None
    #: The clock reading of the last step update (what ``apply_step`` recorded).
    now: float = 0.0

    def step(
        self, active: Sequence[Request], inflight: Iterable[int] = frozenset()
    ) -> tuple[SchedulerOutput, list[Request] | None]:
        """Schedule ``active`` (skipping ``inflight`` ids), run the batch, apply it.

        Returns the scheduler's output and the requests finished in this step; ``None`` instead of
        the list when the scheduler ran nothing (the runner was not called and nothing advanced; the
        output may still hold suspended or preempted requests). What to do then is the caller's
        choice: the engine retries or reports a deadlock, the simulator waits for the next event.
        """
        out = self.schedule(active, inflight)
        if not out.context_requests and not out.generation_requests:
            return out, None
        return out, self.apply(out, self.runner(out))

    def schedule(self, active: Sequence[Request], inflight: Iterable[int] = frozenset()) -> SchedulerOutput:
        """The first third of :meth:`step`: the scheduler's pass, then the ``on_schedule`` hook.

        Public so that an engine that overlaps the batch with the next pass (``engine/overlap.py``)
        keeps the same order of calls: schedule, run, :meth:`apply`.
        """
        out = self.scheduler.schedule(active, inflight)
        if self.on_schedule is not None:
            self.on_schedule(out)
        return out

    def apply(self, out: SchedulerOutput, sampled: Mapping[int, Sequence[int]]) -> list[Request]:
        """The last third of :meth:`step`: read the clock, then the step update; returns the finished."""
        now = self.now = self.clock()
        return apply_step(out, sampled, self.kv, now=now)
