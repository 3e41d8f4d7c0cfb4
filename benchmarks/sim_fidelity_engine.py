"""The engine side of `sim_fidelity.py`: run the real engine step by step and record what it did.

Each step's batch as a `StepShape` (captured from the engine's own scheduler output, with the bytes and
calls of the host<->device block copies the pass made), its duration on the wall and process-CPU
clocks, which requests got a token, and every copy call timed. Kept apart so the benchmark script is
only the fits and the predictions.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np

from kvsched.core.request import SamplingParams
from kvsched.sim.cost import StepShape

SCHED = dict(max_batch_size=16, max_num_tokens=256, chunk_unit_size=64)


def _shape_of(out) -> StepShape:  # noqa: ANN001 - a SchedulerOutput
    s = StepShape()
    for r in out.context_requests:
        s.add_context(r.context_current_position, r.context_chunk_size, r.is_last_context_chunk)
    for r in out.generation_requests:
        s.add_decode(r.num_tokens - 1, 1 + len(r.draft_tokens))
    return s


@dataclass(slots=True)
class EngineRun:
    """Per-step shapes and durations, and per-request token times on two clocks (all arrive at 0)."""

    shapes: list[StepShape] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # step durations, wall clock
    cpu: list[float] = field(default_factory=list)  # step durations, process CPU time
    kinds: list[str] = field(default_factory=list)  # per step: prefill, mixed or decode
    emitted: list[list[int]] = field(default_factory=list)  # per step: ids of the requests that got a token
    copies: list[tuple[int, float, float]] = field(default_factory=list)  # per copy call: bytes, wall, cpu
    suspends: int = 0
    resumes: int = 0
    cache_config: object = None
    scheduler: str = "unified"
    block_bytes: int = 0

    def same_steps(self, other: EngineRun) -> bool:
        return self.shapes == other.shapes and self.emitted == other.emitted


def latencies(run: EngineRun, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """TTFT, TPOT and total time of `run`'s steps replayed with the given per-step durations."""
    clock = np.cumsum(durations)
    times: dict[int, list[float]] = {}
    for t, ids in zip(clock, run.emitted):
        for rid in ids:
            times.setdefault(rid, []).append(float(t))
    ttft = np.array([t[0] for t in times.values()])
    tpot = np.array([(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1])
    return ttft, tpot, float(clock[-1])


def make_engine(threads: int, shared=None, **cache: int):  # noqa: ANN001, ANN201 - an Engine
    """One engine for every run: each Engine loads its own copy of the weights, and where the
    allocator puts them changes the speed of a whole run by up to ~20 % (measured: the first engine of
    a process ran the same workload 15-25 % faster than later ones). Block reuse is off so that a
    repetition of a workload recomputes its prompts as the first run did (same schedule, same work).
    ``shared``: an engine whose loaded model this one runs (a second pool size over the same weights)."""
    import torch

    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs

    torch.set_num_threads(threads)
    cache = {"num_device_blocks": 512, **cache}
    args = EngineArgs(tokens_per_block=16, enable_block_reuse=False, **cache, **SCHED)
    if shared is None:
        ex = Engine(args)
    else:  # the same weights in memory: a second copy of them alone runs ~20 % faster or slower
        from kvsched.engine.parts import build_engine_parts

        p = shared.parts
        ex = Engine(args, parts=build_engine_parts(args, loaded=(p.model, p.model_config, p.tokenizer)))
    original = ex.scheduler.schedule
    storage = ex.parts.storage
    copy_blocks = storage.copy_blocks
    moved = {"h2d": 0, "d2h": 0, "calls": 0}

    def timed_copy(src_tier, src, dst_tier, dst):  # noqa: ANN001, ANN202 - the engine's copies, timed
        w, c = time.perf_counter(), time.process_time()
        copy_blocks(src_tier, src, dst_tier, dst)
        w, c = time.perf_counter() - w, time.process_time() - c
        if src_tier != dst_tier and src:
            nbytes = len(src) * storage.bytes_per_block
            moved["d2h" if int(dst_tier) == 1 else "h2d"] += nbytes
            moved["calls"] += 1
            ex.current_run.copies.append((nbytes, w, c))  # type: ignore[attr-defined]

    storage.copy_blocks = timed_copy

    def schedule(active, inflight_request_ids=frozenset()):  # noqa: ANN001, ANN202
        out = original(active, inflight_request_ids)
        run = ex.current_run  # type: ignore[attr-defined]
        shape = _shape_of(out)  # before the step update moves the positions
        shape.h2d_bytes, shape.d2h_bytes, shape.copy_calls = moved["h2d"], moved["d2h"], moved["calls"]
        moved.update(h2d=0, d2h=0, calls=0)  # the pass's suspends and resumes copy inside schedule
        run.shapes.append(shape)
        ctx, gen = bool(out.context_requests), bool(out.generation_requests)
        run.kinds.append("mixed" if ctx and gen else "prefill" if ctx else "decode")
        return out

    ex.scheduler.schedule = schedule
    return ex


def run_engine(ex, specs) -> EngineRun:  # noqa: ANN001
    """Run the real engine step by step, timing each step on both clocks."""
    run = EngineRun(
        cache_config=ex.parts.cache_config,
        scheduler=ex.args.scheduler,
        block_bytes=ex.parts.storage.bytes_per_block,
    )
    ex.current_run = run
    before = ex.kv.stats()
    for s in specs:
        ex.add_request(
            s.prompt_tokens(), SamplingParams(max_tokens=s.output_len, temperature=0.0, ignore_eos=True),
            request_id=s.request_id,
        )  # fmt: skip
    gc.collect()  # start each run with a clean heap: no collection of earlier garbage inside a timed step
    while ex.has_unfinished_requests():
        w, c = time.perf_counter(), time.process_time()
        outs = ex.step()
        run.wall.append(time.perf_counter() - w)
        run.cpu.append(time.process_time() - c)
        run.emitted.append([o.request_id for o in outs])
        for o in outs:
            if o.finished:
                ex.pop_output(o.request_id)
    after = ex.kv.stats()
    run.suspends = after.num_suspends - before.num_suspends
    run.resumes = after.num_resumes - before.num_resumes
    return run


def repeat(ex, specs, out: list[EngineRun]) -> None:  # noqa: ANN001
    run = run_engine(ex, specs)
    if out and not run.same_steps(out[0]):
        raise RuntimeError("the engine scheduled a repetition differently: per-step medians are undefined")
    out.append(run)


def median_times(runs: list[EngineRun], clock: str) -> np.ndarray:
    """Per-step median over repetitions of the same (deterministic) schedule: step times on a shared
    CPU vary by ~10 % run to run, so one run's times are a noisy target and a noisy fit."""
    return np.median([r.cpu if clock == "cpu" else r.wall for r in runs], axis=0)
