"""Decode windows: many pure-decode steps of one replica in one call, with the same outcome as one by one.

Most simulated steps are plain decodes of the same batch: every active request is decoding and the
scheduler scheduled all of them last step. Until a request finishes, the next step's decision cannot
differ as long as every KV block the batch needs can be allocated without displacing anyone: the unified
pass (TensorRT-LLM PR #11939) and both baselines are functions of the request states and the KV
manager's block counts, and then schedule everyone, in the same order. So a window replays the previous
step's decision for up to ``tokens_per_block`` steps: the decodes that stay inside held blocks are done
in closed form (``k`` tokens per request, one KV ``advance``), and a request that fills its last block
gets its next block at the very step, in batch order, as the scheduler's pass would allocate it (so
evictions and offload copies, and their cost, land in the same step). A step whose new blocks the device
pool could not provide ends the window before it: the regular step then suspends or preempts. Each
step's cost, clock, metrics sample, inter-token gaps and (when recorded) decision are produced exactly as
the step-by-step loop produces them. The window stops before the replica's ``horizon``: the next
arrival, or the next instant another replica could create one.

`tests/sim/test_decode_window.py` checks that summaries, timelines and decisions are identical with the
windows on and off, for every scheduler, with and without memory pressure.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from kvsched.core.request import Request
from kvsched.core.step import finish_request
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
    return list(gen)


def run_window(rep: Replica, batch: list[Request], horizon: float) -> list[Request] | None:
    """Run up to ``tokens_per_block`` decode steps of ``batch``, each starting before ``horizon`` (the
    first always); None when not even the first can run as a replay (a request is done or a new block
    is not available): the caller then takes a regular step."""
    kv = rep.kv
    tpb = kv.tokens_per_block
    capacity, history = kv.capacity, kv.history
    k = tpb
    grow_at: dict[int, list[int]] = {}  # step (1-based) -> batch indices that need a new block then
    for i, r in enumerate(batch):
        h = history(r)
        left = r.max_new_tokens - len(r.output_token_ids)
        if left < k:
            k = left
        room = -(-capacity(r) // tpb) * tpb - h  # decodes that fit the blocks it holds
        grow_at.setdefault(room + 1, []).append(i)
    if k <= 0:
        return None
    first = grow_at.get(1)
    if first is not None and kv.num_free_device_blocks < len(first):
        return None
    n = len(batch)
    cost, last_tok = rep.cost, rep.last_tok
    rids = [r.request_id for r in batch]
    kv_sum = 0
    for r in batch:
        kv_sum += len(r.prompt_token_ids) + len(r.output_token_ids)
    done = [0] * n  # steps already appended and advanced per request (catch-up before a new block)
    shape = rep.shape
    shape.reset()
    shape.num_tokens = shape.num_seqs = shape.num_logits = n
    used_dev = rep._num_device - kv.num_free_device_blocks
    used_host = rep._num_host - kv.num_free_host_blocks
    itl = rep.rec.itl
    gap = array("d", (0.0,))  # a step's one gap, repeated for the batch in C (array * n)
    decisions = rep.decisions
    decision = _decision(batch, rep.index) if decisions is not None else None
    times: list[float] = []
    durations: list[float] = []
    devs: list[int] = []
    hosts: list[int] = []
    now = rep.clock
    rep._copies(shape)  # any copy since the last step (none expected: nothing was scheduled since)
    steps = 0
    while True:
        j = steps + 1
        grow = grow_at.get(j)
        if grow is not None:
            if steps and kv.num_free_device_blocks < len(grow):
                break  # the pass would have to displace someone: the regular step does that
            _grow(rep, batch, grow, done, j)
            used_dev = rep._num_device - kv.num_free_device_blocks
            used_host = rep._num_host - kv.num_free_host_blocks
            rep._copies(shape)  # the offloads of this step's evictions
        shape.attn_pairs = shape.kv_read_tokens = kv_sum
        dt = cost.step_time(shape)
        if shape.copy_calls:
            shape.h2d_bytes = shape.d2h_bytes = 0.0
            shape.copy_calls = 0
        prev, now = now, now + dt
        if steps:
            gap[0] = now - prev
            itl.extend(gap * n)
        else:
            itl.extend([now - last_tok[rid] for rid in rids])
        if decision is not None:
            decisions.append(decision(rep.num_steps + steps))  # type: ignore[union-attr]
        steps = j
        times.append(now)
        durations.append(dt)
        devs.append(used_dev)
        hosts.append(used_host)
        if steps >= k or now >= horizon:
            break
        kv_sum += n
    rep.clock = now
    rep._dt = dt
    finished = _finish(rep, batch, done, steps, now)
    if finished:  # the last step's sample is taken after its step update freed the finished
        devs[-1] = rep._num_device - kv.num_free_device_blocks
        hosts[-1] = rep._num_host - kv.num_free_host_blocks
    rep.rec.steps(times, durations, devs, hosts, n, n, rep.index)
    rep.num_steps += steps
    last_tok.update(dict.fromkeys(rids, now))
    return finished


def _append(rep: Replica, r: Request, count: int) -> None:
    """The next ``count`` output tokens of a decoding request (it has at least one: never the tag)."""
    out = r.output_token_ids
    n_out = len(out)
    f = rep._tok[r.request_id]
    if f is None:
        out.extend(SMALL_TOKENS[n_out : n_out + count])
    else:
        out.extend([f(i) for i in range(n_out, n_out + count)])


def _bump(rep: Replica, r: Request, count: int) -> None:
    """Capacity to ``history + count`` through the scheduling API: ``try_allocate_generation`` grows
    by ``1 + len(draft_tokens)``; the caller made sure this needs no new block or exactly one."""
    if count > 1:
        r.draft_tokens = [0] * (count - 1)
    ok = rep.kv.try_allocate_generation(r)
    r.draft_tokens = []
    if not ok:  # run_window checked the free blocks first; fail loudly rather than diverge
        raise RuntimeError(f"decode window: request {r.request_id} could not grow by {count}")


def _grow(rep: Replica, batch: list[Request], grow: list[int], done: list[int], j: int) -> None:
    """Step ``j`` allocates a block for each of ``grow`` (batch order): first every one of them is
    brought to step ``j - 1`` (its last block filled and committed at the previous step's update, as
    ``apply_step`` does), then each takes its new block, as the pass of step ``j`` does."""
    kv = rep.kv
    for i in grow:
        r = batch[i]
        behind = j - 1 - done[i]
        if behind > 0:
            _append(rep, r, behind)
            _bump(rep, r, behind)
            kv.advance(r, behind)
            done[i] = j - 1
    for i in grow:
        _bump(rep, batch[i], 1)


def _finish(rep: Replica, batch: list[Request], done: list[int], steps: int, now: float) -> list[Request]:
    """The rest of the step updates at once, in batch order as ``apply_step`` makes them: tokens
    appended first (reuse hashes full blocks), then the KV advance, then a finish."""
    kv = rep.kv
    finished: list[Request] = []
    for i, r in enumerate(batch):
        rest = steps - done[i]
        _append(rep, r, rest)
        _bump(rep, r, rest)
        kv.advance(r, rest)
        r.metrics["last_token"] = now
        if len(r.output_token_ids) >= r.max_new_tokens:
            finish_request(r, "length", kv, now=now)
            finished.append(r)
    return finished


def _decision(batch: list[Request], index: int):  # noqa: ANN202 - a step -> StepDecision factory
    from kvsched.sim.replica import StepDecision

    gen = tuple(r.request_id for r in batch)
    return lambda step: StepDecision(step, (), gen, (), (), index)
