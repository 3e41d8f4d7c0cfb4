"""Time one decode step (schedule + apply_step) per running request, for each scheduler.

Real KVCacheManager in metadata mode (storage=None); every request is decoding; the pool is large
enough that nothing is evicted, so this measures the hot path itself (block growth included: every
16th step each request takes a new block). Prints microseconds per running request per step, split into
schedule and step update: the best step and the median step. Time is this thread's CPU time
(``time.thread_time``), so other processes on a shared machine do not inflate it.

    python benchmarks/scheduler_step.py [--sizes 256 1024 4096 16384] [--steps 32]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request
from kvsched.core.scheduler import make_scheduler
from kvsched.core.step import apply_step

PROMPT = 32
TPB = 16

KINDS = (
    ("unified", {}),
    ("two-stage", {"policy": "max_utilization"}),
    ("two-stage", {"policy": "guaranteed_no_evict"}),
    ("recompute", {}),
)


def run(kind: str, extra: dict, n: int, steps: int) -> tuple[float, float, float]:
    """Return (best schedule, best step update, median total) in us per request."""
    max_new = steps + 8
    blocks = n * (-(-(PROMPT + max_new) // TPB) + 1)
    kv = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_device_blocks=blocks), storage=None)
    sched = make_scheduler(kind, kv, max_batch_size=n, max_num_tokens=n * PROMPT, **extra)
    reqs = [Request(i, [1 + (i + k) % 1000 for k in range(PROMPT)], max_new) for i in range(n)]
    out = sched.schedule(reqs)
    assert len(out.context_requests) == n, (kind, len(out.context_requests))
    one = [7]
    sampled = {r.request_id: one for r in reqs}
    apply_step(out, sampled, kv)
    sched_t: list[float] = []
    step_t: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for s in range(steps):
            t0 = time.thread_time()
            out = sched.schedule(reqs)
            t1 = time.thread_time()
            apply_step(out, sampled, kv, now=float(s))
            t2 = time.thread_time()
            assert len(out.generation_requests) == n, (kind, len(out.generation_requests))
            sched_t.append(t1 - t0)
            step_t.append(t2 - t1)
    finally:
        gc.enable()
    total = statistics.median(a + b for a, b in zip(sched_t, step_t))
    return min(sched_t) / n * 1e6, min(step_t) / n * 1e6, total / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    print("us per running request per step (best step: schedule + step update = total; median total)")
    print(f"{'scheduler':<34}{'running':>9}{'schedule':>10}{'step':>8}{'total':>8}{'median':>9}")
    for n in args.sizes:
        for kind, extra in KINDS:
            name = kind + (f" ({extra['policy']})" if extra else "")
            s, u, med = run(kind, extra, n, args.steps)
            print(f"{name:<34}{n:>9}{s:>10.3f}{u:>8.3f}{s + u:>8.3f}{med:>9.3f}")


if __name__ == "__main__":
    main()
