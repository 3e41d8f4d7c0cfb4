"""Each scheduler side by side with the unlimited-KV oracle: Llama-3.1-8B on one H200 (simulated).

Workloads:
  * a slice of the Mooncake conversation trace (real prefix sharing, prefix reuse on), replayed at a
    rate one H200 sustains (memory is ample: the device pool is rarely full);
  * a synthetic memory-pressure workload: lognormal 14k-token prompts, 800-1600 output tokens, Poisson
    arrivals at 1.05 req/s; the oracle's KV working set (time-averaged over the middle 80 % of the run) is
    about 2x the device pool (peak ~4x). Its SLO is looser (TTFT 10 s, TPOT 0.3 s): reading 2x an H200
    pool of KV per decode step takes ~0.1-0.2 s, so even the oracle misses a 0.1 s TPOT target there,
    and at this load the oracle itself is close to saturation (it meets the SLO for ~87 % of requests).

Prints, per workload, the comparison table and each policy's goodput and p99 TPOT relative to the
oracle. Run: `python benchmarks/policies.py [--quick]` (about 3-6 minutes on one core; --quick: ~1).
`--speed` instead simulates the whole conversation trace (12,031 requests, unified, 4 H200 replicas so
that the trace's load is served) and prints its CPU time (target: 15 s on one core) and simulated
steps per CPU second; `--split` adds a timed second run with the CPU split. `--long-prompts` instead runs
four policies (unified, recompute, two-stage guaranteed_no_evict, oracle) on one H200 with a 200 GB host
tier over 4,000 requests of ~15k-token prompts on 16 shared 12k-token documents, ~150 output tokens,
arriving over ~1,000 s (`synthetic.long_prompt_workload`), and prints the wall time of each and of all
four (target: 30 s together).
"""

from __future__ import annotations

import argparse
import time

from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.metrics import SLO
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.report import comparison_table, ratio_lines
from kvsched.sim.scenario import Scenario
from kvsched.sim.synthetic import LengthDist, long_prompt_workload, synthetic_workload
from kvsched.sim.trace import load_mooncake
from kvsched.sim.workload import time_scaled, workload_summary

POLICIES = ("oracle", "unified", "two-stage:max_utilization", "two-stage:guaranteed_no_evict", "recompute")
LONG_POLICIES = ("oracle", "unified", "two-stage:guaranteed_no_evict", "recompute")


def run_all(title: str, scenario: Scenario, specs: list, policies: tuple[str, ...] = POLICIES) -> float:
    info = workload_summary(specs)
    print(
        f"\n== {title}: {info['requests']} requests, mean prompt {info['mean_prompt_len']:.0f}, "
        f"mean output {info['mean_output_len']:.0f}, arrivals over {info['arrival_span_s']:.0f} s; "
        f"pool {scenario.device_blocks()} x {scenario.tokens_per_block} tokens, host {scenario.host_memory_gb:.0f} GB, "
        f"SLO TTFT {scenario.slo.ttft} s / TPOT {scenario.slo.tpot} s"
    )
    results = []
    wall = 0.0
    for pol in policies:
        t0 = time.perf_counter()
        res = scenario.simulator(specs, pol).run()
        dt = time.perf_counter() - t0
        wall += dt
        results.append(res)
        s = res.summary
        print(
            f"  {pol:30s} {dt:6.1f} s wall, {s['cpu_s']:6.1f} s CPU, {s['steps']} steps, {s['sim_steps_per_s']:.0f} steps/s"
        )
    oracle = results[0]
    held = oracle.recorder.timeline()["device_blocks"]
    mid = held[len(held) // 10 : len(held) * 9 // 10] if len(held) >= 10 else held
    print(
        f"  oracle KV working set: mean {mid.mean() / scenario.device_blocks():.2f}x, "
        f"peak {held.max() / scenario.device_blocks():.2f}x the device pool"
    )
    print(comparison_table(results))
    for line in ratio_lines(results):
        print("  " + line)
    return wall


def long_prompts(n: int) -> None:
    """The four policies over the long-prompt workload on one H200 (200 GB host tier), timed together."""
    specs = long_prompt_workload(n, 1000.0 * n / 4000)
    sc = Scenario(
        MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"], host_memory_gb=200, slo=SLO(ttft=10.0, tpot=0.1)
    )
    t_cpu = time.process_time()
    wall = run_all("Long prompts on shared documents", sc, specs, LONG_POLICIES)
    cpu = time.process_time() - t_cpu
    verdict = "  [target <= 30 s: " + ("met]" if wall <= 30 else "NOT met]") if n == 4000 else ""
    print(
        f"\n== long prompts: four policies in {wall:.1f} s wall ({cpu:.1f} s CPU, tables included){verdict}"
    )


def speed(num_requests: int | None, replicas: int, split: bool) -> None:
    """The whole conversation trace (or a prefix of it) with the unified scheduler, uninstrumented:
    CPU seconds and simulated steps per CPU second. With ``split``, a second, instrumented run shows
    how the CPU time divides between the scheduler, the step update and the rest (the timers add a
    little overhead, so the headline figure comes from the first run)."""
    specs = load_mooncake(limit=num_requests)
    sc = Scenario(
        MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"], host_memory_gb=200, num_replicas=replicas
    )
    s = sc.simulator(specs, "unified").run().summary
    what = "full trace" if num_requests is None else f"first {len(specs)} requests of the trace"
    verdict = ""
    if num_requests is None:
        verdict = "  [target <= 15 s: " + ("met]" if s["cpu_s"] <= 15 else "NOT met]")
    print(
        f"\n== speed ({what}, {len(specs)} requests, unified, {replicas} x H200, one core):\n"
        f"  {s['cpu_s']:.1f} s CPU ({s['wall_s']:.1f} s wall) for {s['steps']} steps = "
        f"{s['sim_steps_per_s']:.0f} simulated steps per CPU second{verdict}"
    )
    if split:
        cpu_split(specs, sc)


def cpu_split(specs: list, sc: Scenario) -> None:
    import kvsched.core.loop as loop_mod

    sim = sc.simulator(specs, "unified")
    spent = {"schedule": 0.0, "apply_step": 0.0}
    clock = time.process_time

    def timed(fn, key):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += clock() - t

        return wrapper

    original = loop_mod.apply_step
    loop_mod.apply_step = timed(original, "apply_step")
    for rep in sim.replicas:
        rep.scheduler.schedule = timed(rep.scheduler.schedule, "schedule")
    try:
        s = sim.run().summary
    finally:
        loop_mod.apply_step = original
    rest = s["cpu_s"] - spent["schedule"] - spent["apply_step"]
    print(
        f"  CPU split (instrumented run, {s['cpu_s']:.1f} s): scheduler.schedule {spent['schedule']:.1f} s, "
        f"core apply_step {spent['apply_step']:.1f} s, simulator (cost model, metrics, token lists, "
        f"event loop, timers) {rest:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller slices")
    ap.add_argument("--trace-requests", type=int, default=None)
    ap.add_argument("--pressure-requests", type=int, default=None)
    ap.add_argument("--speed", action="store_true", help="only: time the whole trace (4 replicas)")
    ap.add_argument("--speed-requests", type=int, default=None, help="with --speed: a prefix of the trace")
    ap.add_argument(
        "--split", action="store_true", help="with --speed: a second, timed run for the CPU split"
    )
    ap.add_argument("--long-prompts", action="store_true", help="only: four policies, long-prompt workload")
    ap.add_argument("--long-requests", type=int, default=4000, help="with --long-prompts: requests")
    a = ap.parse_args()
    if a.speed:
        speed(a.speed_requests, replicas=4, split=a.split)
        return
    if a.long_prompts:
        long_prompts(a.long_requests)
        return
    model, gpu = MODEL_PRESETS["llama-3.1-8b"], GPU_PRESETS["h200"]

    n_trace = a.trace_requests or (150 if a.quick else 400)
    specs = load_mooncake(limit=n_trace)
    # the trace offers ~3.4 req/s of 12k-token prompts: more than one H200 prefills; replay at 1 req/s
    natural = (len(specs) - 1) / max(workload_summary(specs)["arrival_span_s"], 1e-9)
    specs = time_scaled(specs, natural / 1.0)
    ample = Scenario(model, gpu, host_memory_gb=200, slo=SLO(ttft=5.0, tpot=0.1))
    run_all("Mooncake conversation slice (memory ample)", ample, specs)

    n_pressure = a.pressure_requests or (150 if a.quick else 400)
    specs = synthetic_workload(
        n_pressure, 1.05, LengthDist("lognormal", 14000, 0.5), LengthDist("uniform", 800, 1600), seed=1
    )
    pressure = Scenario(
        model, gpu, host_memory_gb=400, enable_block_reuse=False, slo=SLO(ttft=10.0, tpot=0.3)
    )
    run_all("Synthetic memory pressure (working set ~2x pool)", pressure, specs)


if __name__ == "__main__":
    main()
