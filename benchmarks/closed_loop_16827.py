"""Replay of TensorRT-LLM issue #16827's workload in the simulator: every policy, with and without reuse of
a paused request's released blocks, published ratios beside the simulated ones.

https://github.com/NVIDIA/TensorRT-LLM/issues/16827 reports, on one H200 with Llama-3.3-70B-FP8 (v1.2.1,
PyTorch backend), 128 requests of 16,384 input and 512 output tokens at closed-loop concurrency 32:
GUARANTEED_NO_EVICT 161.0 output tok/s, MAX_UTILIZATION 96.2 tok/s (-40 %), TTFT p50 35.8 s vs 27.1 s
(MAX_UTILIZATION admits earlier), TPOT p99 9.1x worse. The issue does not state the KV pool size; the
replay assumes 0.95 of HBM for weights + KV and the checkpoint's FP8 KV cache, batch 2048 and 8,192
tokens per step (trtllm-serve's defaults); `--sweep` replays other pool sizes.

The two-stage MAX_UTILIZATION is TensorRT-LLM's V1 policy as capacityScheduler.cpp and kvCacheManager.cpp
write it: a context needs (and takes, at its first chunk) blocks for its whole prompt; when a request
does not fit, the newest *started* request behind it in the active list is paused, its KV freed; with
block reuse its full computed blocks stay cached until an allocation evicts them (a partial last block
is always recomputed). What this replay shows (see the report printed at the end): on this workload that
algorithm pauses a handful of requests over the whole run, not the churn #16827 measured. A paused
request keeps its place in arrival order, comes back only when its whole context fits, and can only
pause started requests *behind* it, and newcomers queue behind it, so pauses never chain; each one costs
one re-prefill of ~16.9k tokens (2.3 s in this cost model, under 1 % of the ~420 s run). The published
-40 % would add ~280 s here: about 120 full re-prefills, one per request. (The previous per-chunk model
of MAX_UTILIZATION churned because a half-prefilled context could pause itself every chunk; V1 cannot:
its later chunks need no blocks.) The pool size moves when MAX_UTILIZATION admits one more request than
GUARANTEED_NO_EVICT (at 11,000 blocks its TTFT p50 ratio is ~0.74, the published 0.76) but never makes it
churn. So the collapse comes from something V1's algorithm as modelled does not have; one candidate is
PyExecutor pausing requests still in flight under the overlap scheduler (`_pause_requests`: "Currently,
self.inflight_req_ids is not [supported]"), consistent with the truncated streams the issue reports
under MAX_UTILIZATION only.
Run: `python benchmarks/closed_loop_16827.py [--sweep]` (a minute; the machine may be shared).
"""

from __future__ import annotations

import argparse
import math

from kvsched.sim.hardware import load_gpu
from kvsched.sim.models import load_model
from kvsched.sim.scenario import Scenario
from kvsched.sim.synthetic import LengthDist, synthetic_workload

SOURCE = "https://github.com/NVIDIA/TensorRT-LLM/issues/16827"
PUBLISHED = {  # output tok/s, TTFT p50 (s); TPOT p99 given only as a ratio (9.1x)
    "two-stage:guaranteed_no_evict": (161.0, 35.8),
    "two-stage:max_utilization": (96.2, 27.1),
}
PUBLISHED_TPOT99_RATIO = 9.1
POLICIES = ("two-stage:guaranteed_no_evict", "two-stage:max_utilization", "unified", "recompute")
BASE = POLICIES[0]


def scenario(reuse: bool, blocks: int | None) -> Scenario:
    model = load_model("llama-3.1-70b", quantization="fp8", kv_cache_dtype="fp8")  # 3.3 has 3.1's shapes
    sc = Scenario(
        model,
        load_gpu("h200"),
        tp=1,
        gpu_memory_fraction=0.95,
        max_batch_size=2048,
        max_num_tokens=8192,
        enable_block_reuse=reuse,
    )
    sc.num_device_blocks = blocks
    return sc


def run(reuse: bool, blocks: int | None) -> dict[str, dict]:
    specs = synthetic_workload(128, math.inf, LengthDist("fixed", 16384), LengthDist("fixed", 512), seed=0)
    sc = scenario(reuse, blocks)
    return {p: sc.simulator(specs, p, max_concurrency=32).run().summary for p in POLICIES}


def table(reuse: bool, blocks: int | None) -> None:
    res = run(reuse, blocks)
    pool = scenario(reuse, blocks).device_blocks()
    print(f"\n== block reuse {'on' if reuse else 'off'}, {pool} device blocks x 32 tokens")
    print(
        f"{'policy':30s} {'tok/s':>6s} {'x base':>6s} {'(pub)':>6s} {'TTFT50':>7s} {'x base':>6s} "
        f"{'(pub)':>6s} {'TPOT99':>7s} {'x base':>6s} {'(pub)':>6s} {'pauses':>6s} {'recomputed':>10s}"
    )
    b = res[BASE]
    pub_b = PUBLISHED[BASE]
    for p, s in res.items():
        tput, ttft, tpot = s["output_token_throughput"], s["ttft"]["p50"], s["tpot"]["p99"]
        pub = PUBLISHED.get(p)
        pt = f"{pub[0] / pub_b[0]:6.2f}" if pub else "     -"
        pf = f"{pub[1] / pub_b[1]:6.2f}" if pub else "     -"
        pp = "  1.00" if p == BASE else (f"{PUBLISHED_TPOT99_RATIO:6.2f}" if pub else "     -")
        print(
            f"{p:30s} {tput:6.1f} {tput / b['output_token_throughput']:6.2f} {pt} {ttft:7.1f} "
            f"{ttft / b['ttft']['p50']:6.2f} {pf} {tpot:7.3f} {tpot / b['tpot']['p99']:6.2f} {pp} "
            f"{s['preemptions']:6d} {s['recomputed_tokens']:10d}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="also replay pools of 11,000 to 14,500 blocks")
    a = p.parse_args()
    print(f"source: {SOURCE}; published: {PUBLISHED} (tok/s, TTFT p50 s), TPOT p99 x{PUBLISHED_TPOT99_RATIO}")
    for reuse in (True, False):
        table(reuse, None)
    if a.sweep:
        for blocks in (11000, 12875, 14500):
            table(True, blocks)


if __name__ == "__main__":
    main()
