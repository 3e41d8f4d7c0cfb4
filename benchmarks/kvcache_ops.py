"""Operations per second of the KV-cache manager's hot calls, and bytes/s of the tier copy path.

    python benchmarks/kvcache_ops.py [--device cuda] [--layers 30 --kv-heads 3 --head-dim 64]
                                     [--copy-blocks 256] [--only prefix|copy]

Prints one line per figure. Targets: a decode grow that needs no new block well under 1 us; prefix
matching (a 32k-token prompt) at most 50 ns per token; host<->device copies of 64+ blocks with
scattered ids at least 50 % of one flat ``copy_`` of the same bytes, timed in the same run (on CPU a
one-thread numpy memcpy of those bytes is printed beside it, and each copy as a % of it too: ``copy_``
is OpenMP-parallel, and on a loaded machine its threads wait for cores, a baseline that flatters).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager, Tier
from kvsched.core.request import Request, RequestState

# Pure-Python figures use this thread's CPU time, so other processes on a busy machine do not inflate
# them; the copy figures (torch may use several threads) use wall time.
CLOCK = time.thread_time


def bench(
    fn: Callable[[], object], min_time: float = 0.5, clock: Callable[[], float] = CLOCK
) -> tuple[float, int]:
    """Seconds per call of ``fn`` (best of 3 runs of at least ``min_time`` / 3 each)."""
    n, best = 1, float("inf")
    while True:
        t = clock()
        for _ in range(n):
            fn()
        dt = clock() - t
        if dt > min_time / 3:
            break
        n *= 2
    for _ in range(3):
        t = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t) / n)
    return best, n


def report(name: str, seconds: float, unit: str = "op") -> None:
    print(f"{name:<52} {1 / seconds:>14,.0f} {unit}/s  {seconds * 1e9:>12,.1f} ns/{unit}")


def in_generation(m: KVCacheManager, rid: int, prompt: list[int], max_new: int) -> Request:
    r = Request(rid, prompt, max_new)
    assert m.prepare_context(r) and m.resize_context(r, r.context_remaining_length)
    m.advance(r, r.context_remaining_length)
    r.context_current_position = r.num_context_tokens
    r.state = RequestState.GENERATION_IN_PROGRESS
    r.output_token_ids.append(1)
    return r


def bench_decode(reuse: bool) -> None:
    tpb = 1 << 24  # one huge block: no decode step ever needs a new one
    m = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_device_blocks=1, enable_block_reuse=reuse))
    r = in_generation(m, 0, [1] * 8, tpb - 8)
    alloc, advance = m.try_allocate_generation, m.advance

    def step() -> None:
        alloc(r)
        advance(r, 1)

    report(f"decode step, no new block (grow+advance, reuse={reuse})", bench(step)[0], "step")
    report("try_allocate_generation, capacity already there", bench(lambda: alloc(r))[0], "call")


def bench_commit(rounds: int = 20) -> None:
    """advance() during a 4,096-token decode with reuse on and 16-token blocks, timed call by call:
    every 16th call hashes and publishes the block it completes (the clock's own cost is removed)."""
    tpb, steps = 16, 4096
    m = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_device_blocks=512, enable_block_reuse=True))
    clock = CLOCK
    t0 = clock()
    for _ in range(10000):
        clock()
    overhead = (clock() - t0) / 10000
    best_commit = best_plain = float("inf")
    for rid in range(rounds):
        r = in_generation(m, rid, [5] * 15 + [rid], steps + 1)
        alloc, advance, out = m.try_allocate_generation, m.advance, r.output_token_ids
        commit = plain = 0.0
        for i in range(steps):
            alloc(r)
            t = clock()
            advance(r, 1)
            dt = clock() - t
            if (16 + i) % tpb == tpb - 1:
                commit += dt
            else:
                plain += dt
            out.append(i)
        m.free_request(r)
        m.clear_cached_blocks()
        best_commit = min(best_commit, commit / (steps // tpb) - overhead)
        best_plain = min(best_plain, plain / (steps - steps // tpb) - overhead)
    report("advance, within a block (reuse on)", best_plain, "call")
    report(f"advance completing a block: hash + publish (tpb={tpb})", best_commit, "call")


def bench_prefix_match(tokens: int = 32768, rounds: int = 20) -> None:
    """prepare_context of a fully cached 32k-token prompt: hash 2,048 blocks, look up, hold; and
    probe_reuse (match only, nothing held) of the same prompt."""
    tpb = 16
    m = KVCacheManager(
        CacheConfig(tokens_per_block=tpb, num_device_blocks=2 * tokens // tpb + 8, enable_block_reuse=True)
    )
    prompt = [(i * 7919) % 50000 for i in range(tokens)]
    m.free_request(in_generation(m, 0, prompt + [1], 2))
    match = free = probe = float("inf")
    for rid in range(1, rounds + 1):
        r = Request(rid, prompt + [2], 1)
        t0 = CLOCK()
        assert m.probe_reuse(r) == tokens
        t1 = CLOCK()
        m.prepare_context(r)
        t2 = CLOCK()
        m.free_request(r)
        t3 = CLOCK()
        assert r.context_current_position == tokens
        probe, match, free = min(probe, t1 - t0), min(match, t2 - t1), min(free, t3 - t2)
    report(f"prefix match of a {tokens}-token prompt (best of {rounds})", match, "match")
    report("  ... per token (target <= 50 ns)", match / tokens, "token")
    report("probe_reuse of that prompt, per token", probe / tokens, "token")
    report(f"free of that request ({tokens // tpb} shared blocks)", free, "free")
    try:
        from kvsched.core.kvcache.keys import MEMO
    except ImportError:  # a tree without the key memo (before/after runs)
        return
    cold = float("inf")
    for rid in range(rounds + 1, 2 * rounds + 1):
        MEMO.clear()  # every block hashed, as when other prefixes pushed this one out of the memo
        r = Request(rid, prompt + [2], 1)
        t0 = CLOCK()
        m.prepare_context(r)
        cold = min(cold, CLOCK() - t0)
        m.free_request(r)
    report("  ... per token, key memo cleared (all hashed)", cold / tokens, "token")


def bench_suspend_resume(storage_factory, label: str, tokens: int = 4096) -> None:
    tpb = 16
    blocks = tokens // tpb + 1
    cfg = CacheConfig(tokens_per_block=tpb, num_device_blocks=blocks, num_host_blocks=blocks)
    storage = storage_factory(cfg)
    m = KVCacheManager(cfg, storage)
    r = in_generation(m, 0, [3] * tokens, 2)

    def cycle() -> None:
        m.suspend_request(r)
        assert m.try_allocate_generation(r)
        m.revert(r, 0)

    sec, _ = bench(cycle, 1.0, time.perf_counter if label != "metadata only" else CLOCK)
    report(f"suspend+resume of a {tokens}-token request ({label})", sec, "cycle")


def bench_copy(args: argparse.Namespace) -> None:
    """GB/s of copy_blocks with consecutive and with scattered ids (a random sample of twice as
    many slots, in random order: a fragmented pool), against one flat ``copy_`` of the same bytes
    between the same two memories, timed in the same run."""
    import random

    import numpy as np
    import torch

    from kvsched.engine.kv_storage import TensorKVStorage

    blocks = args.copy_blocks
    pool = 2 * blocks
    cfg = CacheConfig(tokens_per_block=16, num_device_blocks=pool, num_host_blocks=pool)
    s = TensorKVStorage(
        cfg, args.layers, args.kv_heads, args.head_dim, dtype=torch.float16, device=args.device
    )
    nbytes = blocks * s.bytes_per_block
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    on_dev = torch.ones(nbytes // 2, dtype=torch.float16, device=dev)
    on_host = torch.ones(nbytes // 2, dtype=torch.float16, pin_memory=cuda)
    rng = random.Random(0)
    consecutive = list(range(blocks))
    shape = f"{args.device}, {blocks} blocks x {s.bytes_per_block / 1024:.0f} KiB"
    for name, src, dst, flat_dst, flat_src in (
        ("device->host", Tier.DEVICE, Tier.HOST, on_host, on_dev),
        ("host->device", Tier.HOST, Tier.DEVICE, on_dev, on_host),
    ):

        def flat(d=flat_dst, f=flat_src) -> None:
            d.copy_(f, non_blocking=True)
            sync()

        base, _ = bench(flat, 1.0, time.perf_counter)
        print(f"copy {name} flat copy_ ({shape}){'':<4}{nbytes / base / 1e9:>10,.2f} GB/s  (baseline)")
        one = None
        if not cuda:  # context on a loaded machine: torch's copy_ is OpenMP-parallel, this is not
            d_np, f_np = flat_dst.view(torch.uint8).numpy(), flat_src.view(torch.uint8).numpy()
            one, _ = bench(lambda d=d_np, f=f_np: np.copyto(d, f), 1.0, time.perf_counter)
            print(f"copy {name} flat one-thread memcpy (numpy){'':<14}{nbytes / one / 1e9:>10,.2f} GB/s")
        for label, a, b in (
            ("consecutive ids", consecutive, consecutive),
            ("scattered ids", rng.sample(range(pool), blocks), rng.sample(range(pool), blocks)),
        ):

            def copy(src=src, dst=dst, a=a, b=b) -> None:
                s.copy_blocks(src, a, dst, b)
                sync()

            sec, _ = bench(copy, 1.0, time.perf_counter)
            print(
                f"copy {name} {label:<16}{'':<20}{nbytes / sec / 1e9:>10,.2f} GB/s  "
                f"{sec * 1e3:>8,.2f} ms/batch  {base / sec:>6.0%} of flat"
                + ("" if one is None else f"  {one / sec:>6.0%} of memcpy")
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--copy-blocks", type=int, default=256)
    p.add_argument("--only", choices=("prefix", "copy"), help="run just these figures (a short run)")
    args = p.parse_args()
    if args.only == "prefix":
        bench_prefix_match()
        return
    if args.only == "copy":
        bench_copy(args)
        return

    bench_decode(reuse=False)
    bench_decode(reuse=True)
    bench_commit()
    bench_prefix_match()
    from kvsched.core.kvcache import MetadataStorage

    bench_suspend_resume(lambda cfg: MetadataStorage(0), "metadata only")
    try:
        import torch

        from kvsched.engine.kv_storage import TensorKVStorage
    except ImportError:
        print("torch not installed: tensor figures skipped")
        return

    def tensors(cfg: CacheConfig) -> TensorKVStorage:
        return TensorKVStorage(cfg, args.layers, args.kv_heads, args.head_dim, torch.float16, args.device)

    bench_suspend_resume(tensors, f"{args.layers} layers fp16 on {args.device}")
    bench_copy(args)


if __name__ == "__main__":
    main()
