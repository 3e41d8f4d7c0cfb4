"""Time one decode step (schedule + apply_step) per running request, for each scheduler.

Real KVCacheManager in metadata mode (storage=None); every request is decoding; the pool is large
enough that nothing is evicted, so this measures the hot path itself (block growth included: every
16th step each request takes a new block). Prints microseconds per running request per step, split into
schedule and step update: the best step and the median step. Time is this thread's CPU time
(``time.thread_time``), so other processes on a shared machine do not inflate it.

    python benchmarks/scheduler_step.py [--sizes 256 1024 4096 16384] [--steps 32] [--vllm-size 4096]

When ``vllm`` is importable, kvsched's unified scheduler runs again at the same size (first, before
vLLM's import grows the process), then the same decode-only work through vLLM v1's ``Scheduler``
(``schedule`` + ``update_from_output``, real KV cache manager, no prefix caching on either side, same
block size, a fake ``ModelRunnerOutput`` of one token per request built once, as ``run`` builds its
``sampled`` dict once), and both rows, the load average and the ratio vLLM / kvsched are printed; otherwise one line says it was skipped. vLLM needs no
GPU and none of its compiled ops for this: install its wheel and the few small packages its scheduler's
import chain needs into a folder of their own (never into this environment: vLLM pins a CUDA torch), e.g.

    pip download vllm --no-deps -d "$VLLM_DL"           # vllm 0.33.0 when this was written
    pip install --no-deps --target "$VLLM_SITE" "$VLLM_DL"/vllm-*.whl cbor2 pyzmq msgspec pybase64 \
        cachetools einops partial-json-parser "oss-harmony>=0.0.11" "llguidance>=1.7,<1.8" \
        xgrammar==0.2.8 apache-tvm-ffi==0.1.11
    PYTHONPATH="$VLLM_SITE" python benchmarks/scheduler_step.py --vllm-size 4096

torch and transformers come from this environment. The benchmark sets vLLM's documented
``VLLM_TARGET_DEVICE=cpu`` (unless set) so its CPU platform is picked; vLLM's ``ModelConfig`` reads a
one-layer Llama ``config.json`` written to a temporary folder (no download). The first run spends
~20 s while vLLM inspects the model architecture in a subprocess (it caches the result).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

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

    def check(out) -> None:  # noqa: ANN001
        assert len(out.generation_requests) == n, (kind, len(out.generation_requests))

    return timed_steps(
        n,
        steps,
        lambda: sched.schedule(reqs),
        lambda out, s: apply_step(out, sampled, kv, now=float(s)),
        check,
    )


def timed_steps(
    n: int,
    steps: int,
    schedule: Callable[[], Any],
    update: Callable[[Any, int], object],
    check: Callable[[Any], None],
) -> tuple[float, float, float]:
    """Time ``steps`` steps of ``n`` running requests, the cyclic GC off: ``schedule()`` and
    ``update(output, step)`` each on the thread's CPU clock, ``check(output)`` untimed. Returns (best
    schedule, best update, median total) in us per request; both sides of the comparison use it."""
    sched_t: list[float] = []
    step_t: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for s in range(steps):
            t0 = time.thread_time()
            out = schedule()
            t1 = time.thread_time()
            update(out, s)
            t2 = time.thread_time()
            check(out)
            sched_t.append(t1 - t0)
            step_t.append(t2 - t1)
    finally:
        gc.enable()
    total = statistics.median(a + b for a, b in zip(sched_t, step_t))
    return min(sched_t) / n * 1e6, min(step_t) / n * 1e6, total / n * 1e6


def _tiny_model_dir(root: str) -> str:
    """Write a one-layer Llama ``config.json``: vLLM's ``ModelConfig`` reads only the config (no weights,
    no tokenizer with ``skip_tokenizer_init``), so no download is needed."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=1024, max_position_embeddings=4096,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(root)  # fmt: skip
    return root


def _vllm_scheduler(n: int, max_new: int, model_dir: str):  # -> vllm's Scheduler, imported lazily
    """vLLM v1 ``Scheduler`` built as vLLM's own tests build one (tests/v1/core/utils.py
    ``create_scheduler``): real KV cache manager, no prefix caching, same block size and a pool large
    enough that nothing is preempted."""
    import torch
    from vllm.config import CacheConfig as VCache
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler as VScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    blocks = n * (-(-(PROMPT + max_new) // TPB) + 1) + 1  # + vLLM's reserved null block
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32")
    cfg = VllmConfig(
        scheduler_config=SchedulerConfig(
            max_num_seqs=n, max_num_batched_tokens=n * PROMPT, max_model_len=4096,
            is_encoder_decoder=model.is_encoder_decoder, enable_chunked_prefill=True,
        ),
        model_config=model,
        cache_config=VCache(block_size=TPB, cache_dtype="auto", enable_prefix_caching=False),
    )  # fmt: skip
    cfg.cache_config.num_gpu_blocks = blocks
    spec = FullAttentionSpec(block_size=TPB, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cfg = KVCacheConfig(
        num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]
    )
    return VScheduler(
        vllm_config=cfg,
        kv_cache_config=kv_cfg,
        structured_output_manager=StructuredOutputManager(cfg),
        block_size=TPB,
        log_stats=False,
    )


def vllm_step(n: int, steps: int) -> tuple[float, float, float] | None:
    """(best schedule, best update_from_output, median total) in us per request of vLLM v1's Scheduler
    on the same decode-only work as ``run``, or None when vLLM is not importable or cannot be driven.

    The fake model output (one token per request, vLLM's ``ModelRunnerOutput``) is built once and
    reused, as ``run`` reuses its ``sampled`` dict, so neither side times building it. vLLM's CPU
    platform is chosen through its documented ``VLLM_TARGET_DEVICE=cpu`` (a CUDA wheel on a machine
    without a GPU otherwise fails to infer a device); the scheduler never calls vLLM's compiled ops."""
    if importlib.util.find_spec("vllm") is None:
        print("vLLM v1 Scheduler: not importable (no module 'vllm'); side-by-side skipped")
        return None
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    logging.getLogger("vllm").setLevel(logging.ERROR)  # its CPU-platform notices (no Triton, no _C)
    try:
        from vllm import SamplingParams as VSampling
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request as VRequest
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        print(f"vLLM v1 Scheduler: not importable ({type(exc).__name__}: {exc}); side-by-side skipped")
        return None
    max_new = steps + 8
    try:
        with tempfile.TemporaryDirectory() as root:
            sched = _vllm_scheduler(n, max_new, _tiny_model_dir(root))
        params = VSampling(max_tokens=max_new, ignore_eos=True)
        ids = [str(i) for i in range(n)]
        for i, rid in enumerate(ids):
            prompt = [1 + (i + k) % 1000 for k in range(PROMPT)]
            sched.add_request(VRequest(rid, prompt, params, None))
        fake = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)}, sampled_token_ids=[[7]] * n
        )
        out = sched.schedule()  # the prefill step, not timed (as in ``run``)
        assert len(out.scheduled_new_reqs) == n, len(out.scheduled_new_reqs)
        sched.update_from_output(out, fake)

        def check(out) -> None:  # noqa: ANN001
            assert len(out.num_scheduled_tokens) == n and out.total_num_scheduled_tokens == n
            assert not out.preempted_req_ids, "the pool must hold every request"

        return timed_steps(
            n, steps, sched.schedule, lambda out, s: sched.update_from_output(out, fake), check
        )
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
    # ours measured again right before theirs (same load), and before vLLM's import (torch and
    # thousands of modules) grows this process: kvsched's scheduler does not run next to vLLM either
    ours = run("unified", {}, n, args.steps) if importlib.util.find_spec("vllm") else None
    theirs = vllm_step(n, args.steps)
    if ours is None or theirs is None:
        return
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"side by side, {n} decoding, 1 token each per step, block {TPB}, no preemption (load {load}):")
    for name, (s, u, med) in (("kvsched unified", ours), ("vLLM v1 Scheduler", theirs)):
        print(f"{name:<34}{n:>9}{s:>10.3f}{u:>8.3f}{s + u:>8.3f}{med:>9.3f}")
    print(
        f"vLLM / kvsched = {theirs[2] / ours[2]:.1f}x (median total), "
        f"{(theirs[0] + theirs[1]) / (ours[0] + ours[1]):.1f}x (best step)"
    )


if __name__ == "__main__":
    main()
