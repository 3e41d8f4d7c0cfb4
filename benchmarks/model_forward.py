"""Forward-pass figures of the model alone: ``python benchmarks/model_forward.py [--dummy] [--threads N]``.

Prints load time, decode step time / tokens per second for batches of 1..64 sequences at a given context
length, and prefill tokens per second. Wall time and process CPU time are both shown (CPU time is the
steadier figure on a shared machine). Block tables are deliberately scattered. ``--op-shares`` adds, per
decode batch, the share of the forward's CPU time in the matmuls (projections, MLP, LM head), in
attention (its bmm / SDPA and softmax), in the paged K/V gathers and in the rest (torch.profiler): the
matmuls are the floor of a CPU engine, the rest is what batching and kernels can still win.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvsched.core.config import CacheConfig
from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.loader import load_model

SMOLLM2_SHAPE = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def _timed(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


#: aten ops by kind; anything else (norms, rotary, SiLU, copies, allocation) is "other".
_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"),  # the last: prepacked weights
    "attention": (
        "aten::bmm",
        "aten::baddbmm",
        "aten::_softmax",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ),
    "gather": ("aten::index_select",),
}


def _op_shares(fn) -> str:
    """Self CPU time of two forwards split by op kind (torch.profiler), as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        fn()
    totals = dict.fromkeys((*_KINDS, "other"), 0.0)
    for ev in prof.key_averages():
        kind = next((k for k, names in _KINDS.items() if ev.key in names), "other")
        totals[kind] += ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return "  ".join(f"{k} {v / whole:.0%}" for k, v in totals.items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dummy", action="store_true", help="random weights of SmolLM2's shape (no file read)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--context", type=int, default=256, help="KV length of each decoding sequence")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--op-shares", action="store_true", help="split each decode forward by op kind")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, cfg, _ = load_model(None, dummy_config=SMOLLM2_SHAPE if args.dummy else None, device=args.device)
    print(
        f"load: {time.perf_counter() - t0:.2f} s ({'dummy' if args.dummy else 'SmolLM2 GGUF'}), "
        f"threads={torch.get_num_threads()}"
    )
    tpb = 16
    per_seq = max(args.context, 512) // tpb + 2
    batches = [int(b) for b in args.batches.split(",")]
    prefills = ((1, 512), (16, 64))  # (sequences, tokens each)
    num_seqs = max(*batches, *(bs for bs, _ in prefills))
    cache = CacheConfig(tokens_per_block=tpb, num_device_blocks=num_seqs * per_seq + 1)
    kv = TensorKVStorage(cache, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, device=args.device)
    perm = (torch.randperm(cache.num_device_blocks - 1) + 1).tolist()
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)]
    print(f"{'batch':>5} {'context':>7} {'wall ms/step':>12} {'cpu ms/step':>11} {'tok/s (wall)':>12}")
    for bs in batches:
        seqs = [SeqInput([7], args.context, tables[i], 1) for i in range(bs)]
        wall, cpu = _timed(lambda seqs=seqs: model(ForwardBatch.build(seqs, tpb, args.device), kv), args.reps)
        print(f"{bs:>5} {args.context:>7} {wall * 1e3:>12.1f} {cpu * 1e3:>11.1f} {bs / wall:>12.1f}")
        if args.op_shares:
            print(
                "      " + _op_shares(lambda seqs=seqs: model(ForwardBatch.build(seqs, tpb, args.device), kv))
            )
    for bs, n in prefills:
        seqs = [SeqInput(list(range(100, 100 + n)), 0, tables[i], 1) for i in range(bs)]
        wall, cpu = _timed(lambda seqs=seqs: model(ForwardBatch.build(seqs, tpb, args.device), kv), 1)
        print(
            f"prefill {bs} x {n} tokens: {bs * n / wall:.0f} tok/s wall, {bs * n / cpu:.0f} tok/s per CPU second"
        )


if __name__ == "__main__":
    main()
