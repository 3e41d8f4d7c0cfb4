"""Replay of TensorRT-LLM issue #16827's workload in the simulator, every policy, with and without reuse
of a preempted request's released blocks.

https://github.com/NVIDIA/TensorRT-LLM/issues/16827 reports, on one H200 with Llama-3.3-70B-FP8 (v1.2.1,
PyTorch backend), 128 requests of 16,384 input and 512 output tokens at closed-loop concurrency 32:
GUARANTEED_NO_EVICT 161.0 output tok/s, MAX_UTILIZATION 96.2 tok/s (TTFT p50 35.8 s vs 27.1 s). The
issue does not state the KV pool size here; the replay assumes TensorRT-LLM's default 0.9 of the memory
left after the weights (--gpu-memory-fraction 0.95 of HBM for weights + KV) and the checkpoint's FP8 KV
cache, batch 2048 and 8,192 tokens per step (trtllm-serve's defaults). The two-stage scheduler's
MAX_UTILIZATION is TensorRT-LLM's V1 policy: a request it pauses loses its KV (recompute).
Run: `python benchmarks/closed_loop_16827.py` (a few seconds).
"""

from __future__ import annotations

from kvsched.cli import main

REPORTED = {"two-stage:guaranteed_no_evict": 161.0, "two-stage:max_utilization": 96.2}
POLICIES = "two-stage:guaranteed_no_evict,two-stage:max_utilization,unified,recompute"
ARGS = [
    "sim",
    "--model",
    "llama-3.1-70b",
    "--quantization",
    "fp8",
    "--kv-cache-dtype",
    "fp8",
    "--gpu",
    "h200",
    "--tp",
    "1",
    "--synthetic",
    "--rate",
    "inf",
    "--num-requests",
    "128",
    "--prompt-len",
    "fixed:16384",
    "--output-len",
    "fixed:512",
    "--max-concurrency",
    "32",
    "--max-batch-size",
    "2048",
    "--max-num-tokens",
    "8192",
    "--gpu-memory-fraction",
    "0.95",
    "--no-progress",
]


if __name__ == "__main__":
    print(f"reported (issue #16827, output tok/s): {REPORTED}")
    for reuse in (True, False):
        print(f"\n== block reuse {'on (a preempted request re-reads its cached blocks)' if reuse else 'off'}")
        main([*ARGS, "--policies", POLICIES, *([] if reuse else ["--no-prefix-reuse"])])
