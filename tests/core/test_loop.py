"""The core step loop: schedule → runner → apply_step, in that order, with a fake runner and clock."""

from __future__ import annotations

import itertools

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import InvalidRequestError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.loop import StepLoop
from kvsched.core.protocols import StepRunner
from kvsched.core.request import Request, RequestState
from kvsched.core.scheduler import SchedulerOutput, make_scheduler


class FakeKV:
    """Records what the step update does to the KV manager."""

    def __init__(self, log: list) -> None:
        self.log = log

    def advance(self, req: Request, n: int) -> None:
        self.log.append(("advance", req.request_id, n))

    def free_request(self, req: Request) -> None:
        self.log.append(("free", req.request_id))


class ScriptedScheduler:
    """Hands out the given outputs one per step and logs its arguments."""

    def __init__(self, outputs: list[SchedulerOutput], log: list) -> None:
        self.outputs = iter(outputs)
        self.log = log

    def schedule(self, active, inflight_request_ids=frozenset()) -> SchedulerOutput:
        self.log.append(("schedule", [r.request_id for r in active], set(inflight_request_ids)))
        return next(self.outputs)


def req(rid: int, prompt: int = 4, max_new: int = 2) -> Request:
    return Request(rid, list(range(10, 10 + prompt)), max_new)


def counting_clock(log: list, start: float = 1.0):
    ticks = itertools.count(start)

    def clock() -> float:
        t = float(next(ticks))
        log.append(("clock", t))
        return t

    return clock


def test_one_step_runs_schedule_hook_runner_clock_then_the_step_update():
    log: list = []
    a, b = req(0), req(1)
    a.context_chunk_size = 4
    out = SchedulerOutput([a], [], [b], [], 4)

    def runner(o: SchedulerOutput) -> dict[int, list[int]]:
        log.append(("run", o is out, a.output_token_ids[:]))  # state untouched until apply_step
        return {0: [7]}

    loop = StepLoop(
        ScriptedScheduler([out], log), FakeKV(log), runner, counting_clock(log, 5.0),
        on_schedule=lambda o: log.append(("hook", [r.request_id for r in o.paused_requests])),
    )  # fmt: skip
    got, finished = loop.step([a, b], inflight=[1])
    assert got is out and finished == []
    assert log == [
        ("schedule", [0, 1], {1}),
        ("hook", [1]),
        ("run", True, []),
        ("clock", 5.0),
        ("advance", 0, 4),
    ]
    assert a.output_token_ids == [7] and a.state == RequestState.GENERATION_IN_PROGRESS
    assert a.metrics == {"first_token": 5.0, "last_token": 5.0} and loop.now == 5.0


def test_a_step_that_runs_nothing_calls_neither_runner_nor_clock():
    log: list = []
    paused = req(3)
    out = SchedulerOutput([], [], [paused], [], 0)

    def runner(o: SchedulerOutput) -> dict[int, list[int]]:
        raise AssertionError("the runner must not run an empty batch")

    seen: list[SchedulerOutput] = []
    loop = StepLoop(
        ScriptedScheduler([out], log), FakeKV(log), runner, counting_clock(log), on_schedule=seen.append
    )
    got, finished = loop.step([paused])
    assert got is out and finished is None and seen == [out]
    assert log == [("schedule", [3], set())] and loop.now == 0.0


def test_finished_requests_are_returned_and_released_at_the_clock_time():
    log: list = []
    r = req(0, max_new=2)
    r.context_chunk_size = 4
    outs = [SchedulerOutput([r], [], [], [], 4), SchedulerOutput([], [r], [], [], 1)]
    tokens = iter([[5], [6]])
    loop = StepLoop(
        ScriptedScheduler(outs, log), FakeKV(log), lambda o: {0: next(tokens)}, counting_clock(log)
    )
    assert loop.step([r])[1] == []
    _, finished = loop.step([r])
    assert finished == [r] and r.finish_reason == "length" and r.output_token_ids == [5, 6]
    assert r.metrics["finished"] == 2.0 and loop.now == 2.0
    assert ("free", 0) in log


def test_a_runner_that_omits_a_required_token_is_refused_by_the_step_update():
    r = req(0)
    r.context_chunk_size = 4
    loop = StepLoop(
        ScriptedScheduler([SchedulerOutput([r], [], [], [], 4)], []), FakeKV([]), lambda o: {}, lambda: 0.0
    )
    with pytest.raises(InvalidRequestError, match="request 0: the step produced no token"):
        loop.step([r])


@pytest.mark.parametrize(
    ("kind", "displaces"), [("unified", True), ("two-stage", False), ("recompute", True)]
)
def test_the_loop_drives_a_real_scheduler_and_kv_manager_to_completion(kind, displaces):
    """Three requests on a pool too small for all of them: every one ends with its own tokens and
    the manager holds no request afterwards (two-stage admits by estimate, so it never displaces)."""
    kv = KVCacheManager(CacheConfig(tokens_per_block=4, num_device_blocks=8, num_host_blocks=16))
    sched = make_scheduler(kind, kv, max_batch_size=4, max_num_tokens=16, chunk_unit_size=4)
    ran: list[set[int]] = []

    def runner(out: SchedulerOutput) -> dict[int, list[int]]:  # token = 1000 * id + index
        ran.append({r.request_id for r in out.context_requests + out.generation_requests})
        batch = [r for r in out.context_requests if r.is_last_context_chunk] + out.generation_requests
        return {r.request_id: [1000 * r.request_id + len(r.output_token_ids)] for r in batch}

    t = itertools.count()
    displaced: list[int] = []
    loop = StepLoop(
        sched, kv, runner, lambda: float(next(t)),
        on_schedule=lambda o: displaced.extend(r.request_id for r in o.paused_requests + o.preempted_requests),
    )  # fmt: skip
    active = [Request(i, list(range(1, 11)), 6) for i in range(3)]
    done: list[Request] = []
    for _ in range(200):
        if not active:
            break
        _, finished = loop.step(active)
        if finished:
            done += finished
            active = [r for r in active if not r.is_finished]
    assert not active, "the loop stalled"
    assert sorted(r.request_id for r in done) == [0, 1, 2]
    for r in done:
        assert r.output_token_ids == [1000 * r.request_id + i for i in range(6)]
        assert r.finish_reason == "length"
    assert any(len(s) > 1 for s in ran), "requests were batched together"
    assert bool(displaced) == displaces, "the pool is small enough to force a suspend or a preemption"
    assert kv.stats().num_requests == 0


def test_a_plain_function_is_a_step_runner():
    def runner(out: SchedulerOutput) -> dict[int, list[int]]:
        return {}

    assert isinstance(runner, StepRunner)
    assert not isinstance(object(), StepRunner)
