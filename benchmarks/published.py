"""The simulator against published GPU measurements: each row replayed with its stated configuration.

Data: TensorRT-LLM's performance overview, `docs/source/developer-guide/perf-overview.md` in
NVIDIA/TensorRT-LLM (SOURCE below), table "LLaMA v3.3 70B": `trtllm-bench throughput`, PyTorch backend,
offline (all requests queued at once), synthetic prompts of exactly ISL input and OSL output tokens,
output tokens/s per GPU (first token included). Models: nvidia/Llama-3.3-70B-Instruct-FP8 (ModelOpt FP8)
on H100 / H200 at TP2, nvidia/Llama-3.3-70B-Instruct-FP4 (ModelOpt NVFP4) on B200 at TP1. Request counts
are the page's (3,000 for 1,024/1,024; 1,500 for 8,192/1,024 and 1,024/8,192; 1,000 for 32,768/1,024;
1,000/1,000 is not listed there, 3,000 is used); `--scale` replays a fraction of them (steady state is
reached well before the end; 1.0 replays the full counts).

Deployment as the page and issue #15 state it: ModelOpt quantization_config (FP8 or NVFP4 weights, FP8 KV
cache: the checkpoint's kv_cache_quant_algo), KV cache at 0.95 of the HBM left after the weights
(`--kv_cache_free_gpu_mem_fraction 0.95`), batch 512, 8,192 tokens per step, TensorRT-LLM's default
capacity policy GUARANTEED_NO_EVICT (`--policy` to change it), no host tier.

Calibration: the GPU efficiency factors (mfu, attention_efficiency, hbm_efficiency) are fitted ONLY on
the H100 rows (a grid search minimising squared log error); every other row is a prediction. The H100 and
H200 share the die (same peaks, the H200 has more and faster HBM), so the H200 rows test the memory side
of the model and the B200 rows test FP4 GEMMs and the peaks of another generation with Hopper's factors.
Run: `python benchmarks/published.py [--scale 0.2] [--policy two-stage:guaranteed_no_evict]`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from kvsched.sim.hardware import GpuSpec, load_gpu
from kvsched.sim.models import ModelSpec, load_model
from kvsched.sim.scenario import Scenario
from kvsched.sim.synthetic import LengthDist, synthetic_workload

SOURCE = (
    "https://github.com/NVIDIA/TensorRT-LLM/blob/585c756579dc4d01f21fc13c2f604cdb461ac4f0/"
    "docs/source/developer-guide/perf-overview.md#llama-v33-70b"
)
REQUESTS = {
    (1000, 1000): 3000,
    (1024, 1024): 3000,
    (8192, 1024): 1500,
    (1024, 8192): 1500,
    (32768, 1024): 1000,
}


@dataclass(slots=True, frozen=True)
class Row:
    """One published figure and the configuration it was measured with."""

    gpu: str
    tp: int
    quant: str  # ModelOpt quant_algo of the checkpoint
    isl: int
    osl: int
    published: float  # output tokens/s per GPU
    calibrate: bool = False  # used to fit the efficiency factors
    source: str = SOURCE


# LLaMA v3.3 70B table of SOURCE (output tokens/s/GPU); empty cells of the table are not rows.
ROWS: tuple[Row, ...] = (
    Row("h100", 2, "FP8", 1000, 1000, 2209, calibrate=True),
    Row("h100", 2, "FP8", 8192, 1024, 398, calibrate=True),
    Row("h200", 2, "FP8", 1000, 1000, 2587),
    Row("h200", 2, "FP8", 1024, 1024, 2582),
    Row("h200", 2, "FP8", 1024, 8192, 2009),
    Row("h200", 2, "FP8", 8192, 1024, 537),
    Row("h200", 2, "FP8", 32768, 1024, 120),
    Row("b200", 1, "NVFP4", 1000, 1000, 6920),
    Row("b200", 1, "NVFP4", 1024, 1024, 6842),
    Row("b200", 1, "NVFP4", 1024, 8192, 3242),
    Row("b200", 1, "NVFP4", 8192, 1024, 1362),
    Row("b200", 1, "NVFP4", 32768, 1024, 274),
)

KV_FREE_FRACTION = 0.95
BATCH, TOKENS = 512, 8192


def model_of(row: Row) -> ModelSpec:
    """Llama-3.3-70B has Llama-3.1-70B's shapes; the checkpoint's ModelOpt precision on top."""
    quant = {"FP8": "fp8", "NVFP4": "nvfp4"}[row.quant]
    return load_model("llama-3.1-70b", quantization=quant, kv_cache_dtype="fp8")


def scenario_of(row: Row, gpu: GpuSpec) -> Scenario:
    model = model_of(row)
    sc = Scenario(
        model, gpu, tp=row.tp, max_batch_size=BATCH, max_num_tokens=TOKENS, enable_block_reuse=False
    )
    free = gpu.hbm_bytes - model.weight_bytes_total / row.tp
    sc.num_device_blocks = int(KV_FREE_FRACTION * free // sc.block_bytes)
    return sc


def simulate(row: Row, gpu: GpuSpec, scale: float, policy: str) -> float:
    """Output tokens/s per GPU of the row's offline run."""
    n = max(64, round(REQUESTS[(row.isl, row.osl)] * scale))
    specs = synthetic_workload(
        n, math.inf, LengthDist("fixed", row.isl), LengthDist("fixed", row.osl), seed=0
    )
    res = scenario_of(row, gpu).simulator(specs, policy).run()
    return res.summary["output_token_throughput"] / row.tp


def calibrate(rows: list[Row], scale: float, policy: str) -> dict[str, float]:
    """Grid search of the efficiency factors on `rows` (squared log error)."""
    grid = {
        "mfu": (0.4, 0.5, 0.6, 0.7, 0.8),
        "attention_efficiency": (0.3, 0.45, 0.6, 0.75, 0.9),
        "hbm_efficiency": (0.7, 0.85),
    }
    best, best_err = {}, math.inf
    for values in itertools.product(*grid.values()):
        factors = dict(zip(grid, values))
        err = 0.0
        for row in rows:
            sim = simulate(row, load_gpu(row.gpu).with_efficiency(**factors), scale, policy)
            err += math.log(sim / row.published) ** 2
        if err < best_err:
            best, best_err = factors, err
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=0.2, help="fraction of the published request counts")
    p.add_argument("--policy", default="two-stage:guaranteed_no_evict")
    p.add_argument("--factors", default=None, help="mfu,attention_efficiency,hbm_efficiency: skip the fit")
    a = p.parse_args()
    t0 = time.perf_counter()
    cal = [r for r in ROWS if r.calibrate]
    if a.factors:
        factors = dict(
            zip(("mfu", "attention_efficiency", "hbm_efficiency"), map(float, a.factors.split(",")))
        )
    else:
        factors = calibrate(cal, a.scale, a.policy)
    print(f"source: {SOURCE}")
    print(f"policy {a.policy}, scale {a.scale}, factors fitted on the H100 rows only: {factors}")
    print(
        f"{'role':11s} {'gpu':5s} {'tp':>2s} {'quant':5s} {'ISL/OSL':>11s} {'published':>9s} {'simulated':>9s} {'error':>7s}"
    )
    errors: dict[bool, list[float]] = {True: [], False: []}
    for row in sorted(ROWS, key=lambda r: not r.calibrate):
        sim = simulate(row, load_gpu(row.gpu).with_efficiency(**factors), a.scale, a.policy)
        err = sim / row.published - 1
        errors[row.calibrate].append(err)
        role = "calibration" if row.calibrate else "prediction"
        print(
            f"{role:11s} {row.gpu:5s} {row.tp:2d} {row.quant:5s} {row.isl:>5d}/{row.osl:<5d} "
            f"{row.published:9.0f} {sim:9.0f} {err:+7.1%}"
        )
    pred = np.abs(errors[False])
    print(
        f"predictions: median |error| {np.median(pred):.1%}, worst {pred.max():.1%} over {pred.size} rows; "
        f"calibration rows: median |error| {np.median(np.abs(errors[True])):.1%} "
        f"({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
