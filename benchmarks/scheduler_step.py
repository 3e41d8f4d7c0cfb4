"""Time one decode step (schedule + apply_step) per running request, for each scheduler.

Real KVCacheManager in metadata mode (storage=None); every request is decoding; the pool is large
enough that nothing is evicted, so this measures the hot path itself (block growth included: every
16th step each request takes a new block). Prints microseconds per running request per step, split into
schedule and step update: the best step and the median step. Time is this thread's CPU time
(``time.thread_time``), so other processes on a shared machine do not inflate it.

    python benchmarks/scheduler_step.py [--sizes 256 1024 4096 16384] [--steps 32] [--vllm-size 4096]

When ``vllm`` is importable (its CPU build), the same decode-only measurement runs through vLLM v1's
``Scheduler`` (``schedule`` + ``update_from_output`` with a fake model output of one token per request)
and the ratio to kvsched's unified scheduler is printed; otherwise one line says it was skipped.
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


def vllm_step(n: int, steps: int) -> float | None:
    """Median us per running request per decode step of vLLM v1's Scheduler, or None if unavailable.

    Kept small and guarded: vLLM's constructor signatures move between releases, so any failure to
    build it is reported, never raised."""
    try:
        from vllm import SamplingParams as VSampling
        from vllm.config import CacheConfig as VCache
        from vllm.config import ModelConfig, SchedulerConfig, VllmConfig
        from vllm.v1.core.sched.scheduler import Scheduler as VScheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request as VRequest
        from vllm.v1.structured_output import StructuredOutputManager
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        print(f"vLLM v1 Scheduler: not importable ({type(exc).__name__}: {exc}); side-by-side skipped")
        return None
    try:
        blocks = n * (-(-(PROMPT + steps + 8) // TPB) + 1)
        cfg = VllmConfig(
            scheduler_config=SchedulerConfig(
                max_num_seqs=n, max_num_batched_tokens=n * PROMPT, max_model_len=4096
            ),
            model_config=ModelConfig("facebook/opt-125m", skip_tokenizer_init=True),
            cache_config=VCache(
                block_size=TPB, swap_space=0, cache_dtype="auto", enable_prefix_caching=False
            ),
        )
        cfg.cache_config.num_gpu_blocks = blocks
        spec = FullAttentionSpec(block_size=TPB, num_kv_heads=1, head_size=1, dtype=cfg.model_config.dtype)
        kv_cfg = KVCacheConfig(
            num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
        )
        sched = VScheduler(cfg, kv_cfg, StructuredOutputManager(cfg), block_size=TPB, log_stats=False)
        params = VSampling(max_tokens=steps + 8, ignore_eos=True)
        for i in range(n):
            sched.add_request(
                VRequest(str(i), [1 + (i + k) % 1000 for k in range(PROMPT)], params, None, None)
            )
        times: list[float] = []
        for s in range(steps + 1):
            t0 = time.thread_time()
            out = sched.schedule()
            ids = list(out.num_scheduled_tokens)
            fake = ModelRunnerOutput(
                req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                sampled_token_ids=[[7]] * len(ids), logprobs=None, prompt_logprobs_dict={}, pooler_output=[],
            )  # fmt: skip
            sched.update_from_output(out, fake)
            if s:  # the first step is the prefill
                times.append(time.thread_time() - t0)
        return statistics.median(times) / n * 1e6
    except Exception as exc:  # noqa: BLE001 - an API this code does not know: say so
        print(f"vLLM v1 Scheduler: importable but could not be driven ({type(exc).__name__}: {exc})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--vllm-size", type=int, default=4096, help="running requests of the vLLM side-by-side")
    args = ap.parse_args()
    print("us per running request per step (best step: schedule + step update = total; median total)")
    print(f"{'scheduler':<34}{'running':>9}{'schedule':>10}{'step':>8}{'total':>8}{'median':>9}")
    for n in args.sizes:
        for kind, extra in KINDS:
            name = kind + (f" ({extra['policy']})" if extra else "")
            s, u, med = run(kind, extra, n, args.steps)
            print(f"{name:<34}{n:>9}{s:>10.3f}{u:>8.3f}{s + u:>8.3f}{med:>9.3f}")
    n = args.vllm_size
    theirs = vllm_step(n, args.steps)
    if theirs is not None:
        ours = run("unified", {}, n, args.steps)[2]
        print(
            f"vLLM v1 Scheduler at {n} decoding: {theirs:.3f} us per request per step (median); "
            f"kvsched unified {ours:.3f}; vLLM / kvsched = {theirs / ours:.1f}x"
        )


if __name__ == "__main__":
    main()
