"""Time the model's own forward per row count: the `GemmProfile` a fitted simulator cost model needs.

Why: on a CPU the dense layers' time is the BLAS kernel's, which is not linear in the number of rows
(see `kvsched.sim.calibration`). The profile runs the engine's very forward (same weights, dtype,
quantization, packing, thread count: whatever path the engine takes) over one sequence of M tokens
from position 0, whose causal attention is small next to its linears up to a chunk of a few hundred
tokens, so what is timed is the per-row part of a step: ``body(M)`` = the forward with no logits,
``head(M)`` = the forward with logits for all M rows less ``body(M)``. One sequence, not M of one token
each: per-sequence costs (a decode's KV gather) are the cost model's other features, not the profile's.
It writes only into a private KV pool, never into the engine's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.engine.forward_batch import ForwardBatch
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.sim.calibration import GemmProfile

#: Row counts timed by default: every decode batch up to 16, then the prefill-chunk range up to 256.
DEFAULT_ROWS = (*range(1, 17), 24, 32, 48, 64, 128, 256)
_TPB = 16


@torch.inference_mode()
def measure_gemm_profile(
    model: nn.Module, rows: Sequence[int] = DEFAULT_ROWS, reps: int = 3
) -> tuple[GemmProfile, GemmProfile]:
    """(CPU-time profile, wall-time profile) of ``model`` (a ``LlamaForCausalLM``): at each row count
    one untimed pair of forwards (kernel choice, buffers), then the median of ``reps`` timed pairs."""
    if reps < 1 or not rows:
        raise ConfigError(f"measure_gemm_profile needs reps >= 1 and some rows, got reps={reps} rows={rows}")
    GemmProfile(tuple(rows), (0.0,) * len(rows), (0.0,) * len(rows))  # bad rows fail before any timing
    lm: Any = model
    cfg = lm.config
    embed = lm.model.embed_tokens.weight  # the KV and activations are in its dtype (fp32 when quantized)
    blocks = -(-max(rows) // _TPB)
    cache = CacheConfig(tokens_per_block=_TPB, num_device_blocks=blocks, num_host_blocks=0)
    kv = TensorKVStorage(cache, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, embed.dtype, embed.device)
    table = list(range(blocks))
    out: dict[str, tuple[list[float], list[float]]] = {"cpu": ([], []), "wall": ([], [])}
    for m in rows:
        tokens = [i % cfg.vocab_size for i in range(m)]
        batches = [ForwardBatch.build([(tokens, 0, table, logits)], _TPB, embed.device) for logits in (0, m)]
        samples: dict[str, tuple[list[float], list[float]]] = {"cpu": ([], []), "wall": ([], [])}
        for rep in range(reps + 1):
            cpu0, wall0 = _timed(model, batches[0], kv)
            cpu1, wall1 = _timed(model, batches[1], kv)
            if rep:  # the first pair is the warm-up
                for clock, t0, t1 in (("cpu", cpu0, cpu1), ("wall", wall0, wall1)):
                    samples[clock][0].append(t0)
                    samples[clock][1].append(max(0.0, t1 - t0))
        for clock, (body, head) in samples.items():
            out[clock][0].append(statistics.median(body))
            out[clock][1].append(statistics.median(head))
    rows_t = tuple(int(m) for m in rows)
    cpu, wall = out["cpu"], out["wall"]
    return GemmProfile(rows_t, tuple(cpu[0]), tuple(cpu[1])), GemmProfile(
        rows_t, tuple(wall[0]), tuple(wall[1])
    )


def _timed(model: nn.Module, batch: ForwardBatch, kv: TensorKVStorage) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one forward, waiting for a CUDA device's kernels to finish."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(batch, kv)
    if kv.device.type == "cuda":
        torch.cuda.synchronize(kv.device)
    return time.process_time() - cpu, time.perf_counter() - wall
