"""Decode windows: many pure-decode steps of one replica in one call, with the same outcome as one by one.

Most simulated steps are plain decodes of the same batch: every active request is decoding, the scheduler
scheduled all of them last step, and until some request crosses into a KV block it has not allocated yet
(or finishes) the next step's decision cannot differ: nothing is allocated, nothing evicted, no budget
changes. The unified pass (TensorRT-LLM PR #11939) and both baselines are functions of the request states
and the KV manager's block counts, and none of these move inside such a window. So the window replays
the previous step's decision for ``k`` steps in closed form: ``k`` tokens per request and one KV
``advance`` of ``k``, while each step's cost, clock, metrics sample, inter-token gaps and (when recorded)
decision are produced exactly as the step-by-step loop produces them. The window stops before the
replica's ``horizon``: the next arrival, or the next instant another replica could create one.

`tests/sim/test_decode_window.py` checks that summaries, timelines and decisions are identical with the
windows on and off, for every scheduler, with and without memory pressure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvsched.core.request import Request
from kvsched.core.step import finish_request
from kvsched.sim.cost import StepShape
from kvsched.sim.workload import SMALL_TOKENS

if TYPE_CHECKING:
    from kvsched.sim.replica import Replica

__all__ = ["eligible_batch", "run_window"]


def eligible_batch(rep: Replica, gen: list[Request], num_active: int) -> list[Request] | None:
    """The batch a window may replay after a regular step that ran only ``gen`` (all generations):
    every active request was in it, none carries drafts or a stop rule other than its length."""
    if len(gen) != num_active or rep.spec is not None or rep._has_lora:
        return None
    for r in gen:
        if r.eos_token_ids or r.sampling_params is not None or r.draft_tokens:
            return None
    return gen


def window_length(rep: Replica, batch: list[Request]) -> int:
    """Steps before any request of ``batch`` needs a new KV block or finishes (its last step included)."""
    kv = rep.kv
    tpb = kv.tokens_per_block
    capacity, history = kv.capacity, kv.history
    k = 1 << 30
    for r in batch:
        h = history(r)
        room = -(-capacity(r) // tpb) * tpb - h  # decodes that fit the blocks it holds (never fewer)
        left = r.max_new_tokens - len(r.output_token_ids)
        if room < k:
            k = room
        if left < k:
            k = left
        if k <= 0:
            return 0
    return k


def run_window(rep: Replica, batch: list[Request], k: int, horizon: float) -> list[Request]:
    """Run up to ``k`` decode steps of ``batch`` (at least one; each starts before ``horizon``)."""
    kv, rec, cost, last_tok = rep.kv, rep.rec, rep.cost, rep.last_tok
    n = len(batch)
    rids = [r.request_id for r in batch]
    kv_sum = 0
    for r in batch:
        kv_sum += len(r.prompt_token_ids) + len(r.output_token_ids)
    shape = rep.shape
    shape.reset()
    rep._copies(shape)  # copies since the last step (none expected: nothing was scheduled since)
    shape.num_tokens = shape.num_seqs = shape.num_logits = n
    # this step's clock and gaps, as Replica._run computes them
    start = rep.clock
    dt = _step_time(cost, shape, kv_sum)
    now = start + dt
    itl = rec.itl
    itl.extend([now - last_tok[rid] for rid in rids])
    times = [now]
    durations = [dt]
    shape.d2h_bytes = shape.h2d_bytes = 0.0
    shape.copy_calls = 0
    steps = 1
    while steps < k and now < horizon:
        kv_sum += n
        dt = _step_time(cost, shape, kv_sum)
        prev, now = now, now + dt
        itl.extend([now - prev] * n)
        times.append(now)
        durations.append(dt)
        steps += 1
    rep.clock = now
    rep._dt = dt
    decisions = rep.decisions
    if decisions is not None:
        d = _decision(rep, batch)
        for j in range(steps):
            decisions.append(d(rep.num_steps + j))
    used_dev = rep._num_device - kv.num_free_device_blocks
    used_host = rep._num_host - kv.num_free_host_blocks
    record = rec.step
    index = rep.index
    for j in range(steps - 1):
        record(times[j], durations[j], used_dev, used_host, n, n, index)
    finished = _advance(rep, batch, steps, now)
    if finished:
        used_dev = rep._num_device - kv.num_free_device_blocks
        used_host = rep._num_host - kv.num_free_host_blocks
    record(now, dt, used_dev, used_host, n, n, index)
    rep.num_steps += steps
    last_tok.update(dict.fromkeys(rids, now))
    return finished


def _step_time(cost: object, shape: StepShape, kv_sum: int) -> float:
    shape.attn_pairs = shape.kv_read_tokens = kv_sum
    return cost.step_time(shape)  # type: ignore[attr-defined]


def _advance(rep: Replica, batch: list[Request], steps: int, now: float) -> list[Request]:
    """The step updates of ``steps`` decodes at once, in batch order as ``apply_step`` makes them:
    tokens appended first (reuse hashes full blocks), then the KV advance, then a finish."""
    kv = rep.kv
    alloc, advance = kv.try_allocate_generation, kv.advance
    tok, small = rep._tok, SMALL_TOKENS
    slots = [0] * (steps - 1)
    finished: list[Request] = []
    for r in batch:
        rid = r.request_id
        out = r.output_token_ids
        n_out = len(out)
        f = tok[rid]
        if f is None:
            out.extend(small[n_out : n_out + steps])  # a decode: n_out >= 1, never the tag
        else:
            out.extend([f(i) for i in range(n_out, n_out + steps)])
        if steps > 1:
            r.draft_tokens = slots  # capacity history + steps, within the held blocks (no allocation)
        ok = alloc(r)
        r.draft_tokens = []
        if not ok:  # window_length rules this out; fail loudly rather than diverge
            raise RuntimeError(f"decode window: request {rid} could not grow within its blocks")
        advance(r, steps)
        r.metrics["last_token"] = now
        if len(out) >= r.max_new_tokens:
            finish_request(r, "length", kv, now=now)
            finished.append(r)
    return finished


def _decision(rep: Replica, batch: list[Request]):  # noqa: ANN202 - a step -> StepDecision factory
    from kvsched.sim.replica import StepDecision

    gen = tuple(r.request_id for r in batch)
    index = rep.index
    return lambda step: StepDecision(step, (), gen, (), (), index)
