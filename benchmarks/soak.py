"""Soak: many thousand requests through the engine (tiny random-weight model, token-id prompts) with random
lengths, priorities, sampling and aborts (a client that disconnects), and a tight KV pool so requests are
suspended, resumed, preempted and reuse prefixes. Samples RSS (``/proc/self/status`` VmRSS) and KV usage
over the run and prints them, then a summary comparing the first and last quartile of the samples: both
should come back flat (no growth = nothing leaks per request). Prints, never asserts; a smaller version
runs in the tests (tests/engine/test_soak.py).

    python benchmarks/soak.py [--requests 5000] [--concurrency 48] [--abort-rate 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from tqdm import tqdm

from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.dummy import dummy_model

TINY = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def rss_mb() -> float:
    """Resident set size of this process (Linux), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(seed: int) -> Engine:
    args = EngineArgs(
        max_model_len=320,
        tokens_per_block=16,
        num_device_blocks=96,
        num_host_blocks=48,
        max_batch_size=32,
        priority_mode=True,
        seed=seed,
    )
    model = dummy_model(TINY, dtype=torch.float32, device="cpu", seed=seed)
    return Engine(args, parts=build_engine_parts(args, loaded=(model, TINY, None)))


def _sample(ex: Engine, ended: int, t_s: float, in_flight: int) -> dict:
    """One row of the report: the process's RSS and the KV pool's use now."""
    s = ex.kv.stats()
    return {
        "ended": ended,
        "t_s": t_s,
        "rss_mb": rss_mb(),
        "in_flight": in_flight,
        "device_used": s.used_device_blocks,
        "host_used": s.used_host_blocks,
        "device_cached": s.cached_device_blocks,
        "kv_requests": s.num_requests,
    }


def soak(
    num_requests: int, concurrency: int, abort_rate: float, seed: int, num_samples: int = 40
) -> list[dict]:
    """Run the soak; returns the samples (one per ``num_requests / num_samples`` ended requests)."""
    rng = random.Random(seed)
    ex = build(seed)
    prefixes = [[rng.randrange(TINY.vocab_size) for _ in range(48)] for _ in range(4)]
    live: list = []
    submitted = ended = 0
    every = max(1, num_requests // num_samples)
    samples: list[dict] = []
    start = time.monotonic()
    bar = tqdm(total=num_requests, desc="soak", unit="req")
    while ended < num_requests:
        while submitted < num_requests and len(live) < concurrency:
            head = rng.choice(prefixes) if rng.random() < 0.5 else []
            prompt = head + [rng.randrange(TINY.vocab_size) for _ in range(rng.randint(1, 160))]
            params = SamplingParams(
                max_tokens=rng.randint(1, 96),
                temperature=rng.choice([0.0, 0.8]),
                seed=rng.choice([None, rng.randrange(1 << 32)]),
                logprobs=rng.choice([None, 0, 5]),
            )
            live.append(ex.add_request(prompt, params, priority=rng.choice([0, 0, 5, 10])))
            submitted += 1
        done = [o.request_id for o in ex.step() if o.finished]
        if live and rng.random() < abort_rate:  # a client went away
            victim = live[rng.randrange(len(live))]
            if victim not in done:
                ex.abort_request(victim)
                done.append(victim)
        for rid in done:
            ex.pop_output(rid)
            live.remove(rid)
            ended += 1
            bar.update(1)
            if ended % every == 0:
                samples.append(_sample(ex, ended, time.monotonic() - start, len(live)))
    bar.close()
    check_invariants(ex.kv)
    samples.append(_sample(ex, ended, time.monotonic() - start, 0))
    s = ex.kv.stats()
    stats = ex.get_stats()
    print(
        f"steps {stats.num_steps}, finish reasons {stats.finish_reasons}, suspends {s.num_suspends}, "
        f"resumes {s.num_resumes}, preempted {stats.num_preempted}, reuse hit tokens "
        f"{s.reuse_hit_tokens_device + s.reuse_hit_tokens_host}; invariants hold"
    )
    return samples


def report(samples: list[dict], concurrency: int) -> None:
    cols = ["ended", "t_s", "rss_mb", "in_flight", "device_used", "host_used", "device_cached", "kv_requests"]
    print(" ".join(f"{c:>13}" for c in cols))
    for row in samples:
        print(" ".join(f"{row[c]:>13.1f}" if isinstance(row[c], float) else f"{row[c]:>13}" for c in cols))
    # Steady state only: the samples before the last ``concurrency`` requests drain.
    body = [r for r in samples[:-1] if r["ended"] <= samples[-1]["ended"] - concurrency] or samples
    q = max(1, len(body) // 4)
    first, last = body[:q], body[-q:]
    print("\nfirst vs last quartile of the samples (mean):")
    for c in ("rss_mb", "device_used", "host_used", "in_flight"):
        a, b = statistics.mean(r[c] for r in first), statistics.mean(r[c] for r in last)
        print(f"  {c:<12} {a:10.1f} -> {b:10.1f}  ({b - a:+.1f})")
    end = samples[-1]
    print(
        f"after the run: {end['kv_requests']} requests hold KV, {end['device_used']} device and "
        f"{end['host_used']} host blocks in use ({end['device_cached']} device blocks stay cached for reuse)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument(
        "--abort-rate", type=float, default=0.1, help="chance per step that a live request is aborted"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny batches: 1 is fastest)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    report(soak(a.requests, a.concurrency, a.abort_rate, a.seed), a.concurrency)


if __name__ == "__main__":
    main()
