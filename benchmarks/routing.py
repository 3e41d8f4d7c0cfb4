"""Routers compared on the Mooncake conversation trace: 4 and 8 simulated replicas, one run.

Llama-3.1-8B, one H200 per replica (simulated: the real unified scheduler and KV manager on the roofline
cost model), the Mooncake conversation trace shipped with kvsched (its requests share prefixes through
hash blocks). Every router of `kvsched.core.routing` (the ones the Ray front-end uses) serves the same
requests; for N replicas the arrivals are compressed by 4/N so that each configuration sees the same
load per replica (`--same-trace` replays the trace as is instead). Prints per (replicas, router): prefix
hit rate (reused / context tokens, from the replicas' KV managers), goodput (req/s meeting the SLOs),
TTFT p50 / p99, and each of them relative to `least_loaded` measured in the same run. The trace links no
turns into conversations (sharing is through hash blocks only), so `sticky` has no session to follow
there and decides as `least_loaded` does.

`--conversations N` replays N synthetic multi-turn conversations instead (5 turns, a 1,000-token system
prompt shared by all, each turn's prompt = the previous prompt + its answer + a new message, 5 s think
time): there `sticky` keeps each conversation's prefix, and kv_aware's sessions do too.

Run: `python benchmarks/routing.py [--num-requests 2000] [--replicas 4,8]` (about a minute on one core).
`--micro` instead times the router's own calls: `choose` for a 16k-token prompt over 8 replicas (against
`least_loaded` and against hashing the prompt alone) and `on_events` per event.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from kvsched.core.routing import ROUTER_KINDS, normalize_router_kind
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.metrics import SLO
from kvsched.sim.models import MODEL_PRESETS
from kvsched.sim.scenario import Scenario
from kvsched.sim.simulator import SimResult
from kvsched.sim.synthetic import LengthDist, multi_turn_workload
from kvsched.sim.trace import load_mooncake
from kvsched.sim.workload import time_scaled, workload_summary

BASELINE = "least_loaded"


def run(args: argparse.Namespace) -> None:
    routers = [normalize_router_kind(r) for r in args.routers.split(",") if r.strip()]
    if BASELINE not in routers:
        routers.insert(0, BASELINE)
    replicas = [int(x) for x in args.replicas.split(",") if x.strip()]
    if args.conversations:
        trace = multi_turn_workload(
            args.conversations,
            5,
            args.conversation_rate,
            LengthDist.parse("lognormal:1500:0.6"),
            LengthDist.parse("lognormal:300:0.6"),
            think_time=5.0,
            system_prompt_len=1000,
        )
        source = f"{args.conversations} synthetic 5-turn conversations at {args.conversation_rate:g}/s"
    else:
        trace = load_mooncake(limit=args.num_requests)
        source = "the Mooncake conversation trace"
    info = workload_summary(trace)
    model, gpu = MODEL_PRESETS[args.model], GPU_PRESETS[args.gpu]
    slo = SLO(args.slo_ttft, args.slo_tpot)
    print(
        f"{info['requests']} requests of {source} (mean prompt "
        f"{info['mean_prompt_len']:.0f}, output {info['mean_output_len']:.0f}, arrivals over "
        f"{info['arrival_span_s']:.0f} s); {model.name} on N x {gpu.name}, unified scheduler, host tier "
        f"{args.host_memory_gb:g} GB per replica, SLO TTFT {slo.ttft} s / TPOT {slo.tpot} s; "
        + ("same trace for every N" if args.same_trace else "arrivals x 4/N (same load per replica)")
    )
    results: dict[tuple[int, str], SimResult] = {}
    cpu: dict[tuple[int, str], float] = {}
    jobs = [(n, r) for n in replicas for r in routers]
    bar = tqdm(jobs, unit="run", mininterval=0.5)
    for n, router in bar:
        bar.set_postfix_str(f"{n} replicas, {router}")
        specs = trace if args.same_trace else time_scaled(trace, 4 / n)
        sc = Scenario(model, gpu, num_replicas=n, router=router, host_memory_gb=args.host_memory_gb, slo=slo)
        t0 = time.process_time()
        results[n, router] = sc.simulator(specs, "unified").run()
        cpu[n, router] = time.process_time() - t0
    bar.close()
    head = (
        f"{'replicas':>8} {'router':<13} {'hit%':>6} {'goodput':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
        f"  {'hit/LL':>7} {'good/LL':>7} {'p50/LL':>7} {'p99/LL':>7} {'CPU s':>6}"
    )
    print(head)
    print("-" * len(head))
    for n in replicas:
        base = results[n, BASELINE].summary
        for router in routers:
            s = results[n, router].summary
            print(
                f"{n:>8} {router:<13} {s['prefix_hit_rate']:>6.1%} {s['goodput']:>8.2f} "
                f"{s['ttft']['p50']:>9.3f} {s['ttft']['p99']:>9.3f}  "
                f"{_ratio(s['prefix_hit_rate'], base['prefix_hit_rate'])} {_ratio(s['goodput'], base['goodput'])} "
                f"{_ratio(s['ttft']['p50'], base['ttft']['p50'])} {_ratio(s['ttft']['p99'], base['ttft']['p99'])} "
                f"{cpu[n, router]:>6.1f}"
            )
    print("(ratios against least_loaded in the same run; the machine may be loaded: CPU s is indicative)")


def micro() -> None:
    """The KV-aware router's hot calls, each against a baseline timed in the same run."""
    from kvsched.core.kvcache.types import KVEvent, Tier
    from kvsched.core.routing import KVAwareRouter, ReplicaLoad, make_router, prompt_keys

    bs, n_rep = 32, 8
    loads = {i: ReplicaLoad(num_running=i, num_waiting=1, kv_usage=0.5) for i in range(n_rep)}
    router = KVAwareRouter(bs)
    prompts = [[p * 100_000 + t for t in range(16_384)] for p in range(64)]
    for p, toks in enumerate(prompts):  # each prompt cached on two replicas, 20k other blocks each
        keys = prompt_keys(toks, bs)
        for rep in (p % n_rep, (p + 3) % n_rep):
            router.on_events(rep, [KVEvent("stored", k, Tier.DEVICE) for k in keys[: 256 + p]])
    filler = [
        KVEvent("stored", bytes([i % 251, i // 251 % 251, i // 63001]) * 11, Tier.DEVICE)
        for i in range(20_000)
    ]
    for rep in range(n_rep):
        router.on_events(rep, filler)

    def per_call(fn, n: int) -> float:  # noqa: ANN001
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - t) / n * 1e6

    ll = make_router("least_loaded", block_size=bs)
    t_ll = per_call(lambda i: ll.choose(prompts[i % 64], loads), 2000)
    t_keys = per_call(lambda i: prompt_keys(prompts[i % 64], bs), 200)
    t_kv = per_call(lambda i: router.choose(prompts[i % 64], loads), 200)
    router.predict_ttl = 0  # the same index, no predictions made (those made stay, but match ignores them)
    t_kv0 = per_call(lambda i: router.choose(prompts[i % 64], loads), 200)
    churn = [
        KVEvent("removed" if i % 2 else "stored", filler[i // 2].block_hash, Tier.HOST) for i in range(20_000)
    ]
    t_ev = per_call(lambda i: router.on_events(i % n_rep, churn), 20) / len(churn) * 1e3
    print(
        f"choose, 16,384-token prompt, {n_rep} replicas x ~20k blocks (machine may be loaded):\n"
        f"  kv_aware {t_kv:8.1f} us (without predictions {t_kv0:8.1f} us)   prompt_keys alone {t_keys:8.1f} us   "
        f"least_loaded {t_ll:6.2f} us   kv_aware / prompt_keys {t_kv / t_keys:.2f}x\n"
        f"  on_events: {t_ev:.0f} ns per event"
    )


def _ratio(x: float, base: float) -> str:
    return f"{x / base:>7.3f}" if base else f"{'n/a':>7}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=2000, help="first N requests of the trace")
    ap.add_argument("--replicas", default="4,8", help="comma-separated replica counts")
    ap.add_argument("--routers", default=",".join(ROUTER_KINDS), help=f"comma-separated of {ROUTER_KINDS}")
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--gpu", default="h200", choices=sorted(GPU_PRESETS))
    ap.add_argument("--host-memory-gb", type=float, default=0.0, help="host KV tier per replica")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--same-trace", action="store_true", help="do not compress arrivals for N > 4")
    ap.add_argument("--micro", action="store_true", help="only: time choose() and on_events()")
    ap.add_argument("--conversations", type=int, default=0, help="> 0: synthetic multi-turn instead")
    ap.add_argument("--conversation-rate", type=float, default=5.0, help="new conversations per second")
    a = ap.parse_args()
    if a.micro:
        micro()
    else:
        run(a)


if __name__ == "__main__":
    main()
