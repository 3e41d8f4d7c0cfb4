"""`kvsched sim`: several policies on one workload and one deployment; table, JSON, PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.core.priority import PriorityMix
from kvsched.core.routing import ROUTER_KINDS, normalize_router_kind
from kvsched.sim.hardware import GPU_PRESETS, load_gpu
from kvsched.sim.lora import LoraSpec
from kvsched.sim.metrics import SLO
from kvsched.sim.models import MODEL_PRESETS, load_model
from kvsched.sim.quant import KV_FORMATS, WEIGHT_FORMATS
from kvsched.sim.report import comparison_table, priority_lines, ratio_lines, write_json
from kvsched.sim.scenario import POLICIES, Scenario, parse_policy
from kvsched.sim.speculation import SPEC_METHODS, Speculation
from kvsched.sim.synthetic import LengthDist, multi_turn_workload, synthetic_workload
from kvsched.sim.trace import load_mooncake
from kvsched.sim.workload import RequestSpec, time_scaled, with_priorities, workload_summary


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="simulate serving a workload with the real scheduler and KV manager on a GPU cost model",
        description=__doc__,
    )
    d = p.add_argument_group("deployment")
    d.add_argument(
        "--model", default="llama-3.1-8b", help=f"preset {sorted(MODEL_PRESETS)} or a HF config.json"
    )
    d.add_argument("--gpu", default="h200", help=f"preset {sorted(GPU_PRESETS)} or a JSON file")
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    d.add_argument("--replicas", type=int, default=1, help="data-parallel instances behind a router")
    d.add_argument(
        "--router",
        type=_router_kind,
        choices=ROUTER_KINDS,
        default="least_loaded",
        help="how requests pick a replica; kv_aware (or kv-aware): fewest prefill tokens not cached there "
        "plus load, from the replicas' KV events (kvsched.core.routing)",
    )
    d.add_argument("--tokens-per-block", type=int, default=32)
    d.add_argument(
        "--num-device-blocks", type=int, default=None, help="default: what HBM holds after weights"
    )
    d.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    d.add_argument("--host-memory-gb", type=float, default=0.0, help="host KV tier per GPU (0 = none)")
    d.add_argument("--no-prefix-reuse", action="store_true")
    d.add_argument("--max-batch-size", type=int, default=256)
    d.add_argument("--max-num-tokens", type=int, default=8192)
    d.add_argument("--chunk-unit-size", type=int, default=256, help="0 = no chunked prefill")
    d.add_argument("--step-overhead", type=float, default=2e-3, help="seconds per step")
    d.add_argument("--serial-copies", action="store_true", help="host<->device copies do not overlap compute")
    d.add_argument(
        "--priority-mode",
        action="store_true",
        help="schedulers serve higher request priority first (see --priority-mix)",
    )
    d.add_argument("--mfu", type=float, default=None)
    d.add_argument(
        "--speculative",
        choices=SPEC_METHODS,
        default=None,
        help="speculative decoding: ngram (prompt lookup, free) or draft (a draft model's forwards)",
    )
    d.add_argument("--num-speculative-tokens", type=int, default=3, help="k drafts per decode")
    d.add_argument(
        "--acceptance-rate", type=float, default=0.7, help="mean probability that a draft is accepted"
    )
    d.add_argument(
        "--acceptance-spread",
        type=float,
        default=0.0,
        help="std of the per-request acceptance rate (Beta, seeded by --seed; 0 = all the same)",
    )
    d.add_argument(
        "--draft-model", default=None, help="draft preset or HF config.json (default: a truncated target)"
    )
    d.add_argument(
        "--draft-num-layers", type=int, default=None, help="layers of the truncated target (default: 1/4)"
    )
    d.add_argument("--hbm-efficiency", type=float, default=None)
    d.add_argument(
        "--quantization",
        default="auto",
        choices=("auto", "none", *sorted(WEIGHT_FORMATS)),
        help="weights and GEMM rate (auto: the config's quantization_config / torch_dtype; fp8 and nvfp4 "
        "run at the GPU's FP8 / FP4 peak)",
    )
    d.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", *sorted(KV_FORMATS)),
        help="KV cache element type (auto: the config's kv_cache_quant_algo / kv_cache_scheme, else its dtype)",
    )

    w = p.add_argument_group("workload (a trace by default)")
    w.add_argument(
        "--trace",
        default=None,
        help="Mooncake JSONL, plain or .gz (default: the Mooncake conversation trace shipped with kvsched)",
    )
    w.add_argument("--trace-start", type=int, default=0)
    w.add_argument("--num-requests", type=int, default=None, help="trace slice length / synthetic count")
    w.add_argument("--synthetic", action="store_true", help="Poisson/gamma arrivals instead of a trace")
    w.add_argument("--rate", type=float, default=4.0, help="synthetic req/s (or conversations/s)")
    w.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    w.add_argument("--cv", type=float, default=1.0, help="gamma coefficient of variation")
    w.add_argument(
        "--prompt-len", default="lognormal:2048:0.6", help="fixed:N | uniform:A:B | lognormal:MEAN:S"
    )
    w.add_argument("--output-len", default="lognormal:256:0.6")
    w.add_argument("--shared-prefix-len", type=int, default=0)
    w.add_argument("--num-shared-prefixes", type=int, default=1)
    w.add_argument("--lora-ids", default="", help="comma-separated adapter ids")
    w.add_argument("--lora-fraction", type=float, default=0.0)
    w.add_argument(
        "--lora-max-pages", type=int, default=0, help="PEFT device pages for adapters (0 = unlimited)"
    )
    w.add_argument("--lora-pages-per-adapter", type=int, default=1)
    w.add_argument("--lora-rank", type=int, default=16, help="adapter rank (its FLOPs, reads, load bytes)")
    w.add_argument(
        "--lora-targets", default="q,k,v,o", help="wrapped linears, comma-separated of q,k,v,o,gate,up,down"
    )
    w.add_argument("--turns", type=int, default=0, help="> 0: multi-turn conversations of this many turns")
    w.add_argument("--think-time", type=float, default=5.0)
    w.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply arrival times (0.5 = twice as fast)"
    )
    w.add_argument(
        "--priority-mix",
        default=None,
        metavar="P:W,...",
        help="give each request (each conversation) a priority drawn with these weights, e.g. 0:0.8,10:0.2 "
        "(higher = more important)",
    )
    w.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="closed loop, as vllm bench serve: at most N requests in the system, the next submitted when "
        "one finishes; TTFT counts from submission",
    )
    w.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run and output")
    r.add_argument("--policies", default="unified,recompute,oracle", help=f"comma-separated of {POLICIES}")
    r.add_argument("--sweep-rates", default="", help="comma-separated req/s: rerun each policy per rate")
    r.add_argument("--slo-ttft", type=float, default=2.0)
    r.add_argument("--slo-tpot", type=float, default=0.1)
    r.add_argument("--json", default=None, help="write the summaries here")
    r.add_argument("--plot-dir", default=None, help="write PNG plots here")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def build_scenario(a: argparse.Namespace) -> Scenario:
    gpu = load_gpu(a.gpu)
    eff = {k: v for k, v in (("mfu", a.mfu), ("hbm_efficiency", a.hbm_efficiency)) if v is not None}
    if eff:
        gpu = gpu.with_efficiency(**eff)
    return Scenario(
        load_model(a.model, quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype),
        gpu,
        tp=a.tp,
        tokens_per_block=a.tokens_per_block,
        gpu_memory_fraction=a.gpu_memory_fraction,
        num_device_blocks=a.num_device_blocks,
        host_memory_gb=a.host_memory_gb,
        enable_block_reuse=not a.no_prefix_reuse,
        max_batch_size=a.max_batch_size,
        max_num_tokens=a.max_num_tokens,
        chunk_unit_size=a.chunk_unit_size or None,
        step_overhead=a.step_overhead,
        overlap_copies=not a.serial_copies,
        slo=SLO(a.slo_ttft, a.slo_tpot),
        num_replicas=a.replicas,
        router=a.router,
        lora_max_pages=a.lora_max_pages,
        lora_pages_per_adapter=a.lora_pages_per_adapter,
        lora=LoraSpec(a.lora_rank, LoraSpec.parse_targets(a.lora_targets)),
        priority_mode=a.priority_mode,
        speculation=_speculation(a),
    )


def _speculation(a: argparse.Namespace) -> Speculation | None:
    if a.speculative is None:
        return None
    return Speculation(
        a.speculative,
        a.num_speculative_tokens,
        a.acceptance_rate,
        a.acceptance_spread,
        draft_model=None if a.draft_model is None else load_model(a.draft_model),
        draft_num_layers=a.draft_num_layers,
        seed=a.seed,
    )


def build_workload(a: argparse.Namespace, rate: float | None = None) -> list[RequestSpec]:
    """The workload of the arguments; `rate` overrides the offered request rate (sweeps)."""
    if a.turns > 0:
        n = a.num_requests or 100
        specs = multi_turn_workload(
            n,
            a.turns,
            rate or a.rate,
            LengthDist.parse(a.prompt_len),
            LengthDist.parse(a.output_len),
            think_time=a.think_time,
            system_prompt_len=a.shared_prefix_len,
            seed=a.seed,
        )
    elif a.synthetic:
        loras = _numbers(a.lora_ids, "--lora-ids", int)
        specs = synthetic_workload(
            a.num_requests or 1000,
            rate or a.rate,
            LengthDist.parse(a.prompt_len),
            LengthDist.parse(a.output_len),
            seed=a.seed,
            process=a.arrival,
            cv=a.cv,
            shared_prefix_len=a.shared_prefix_len,
            num_shared_prefixes=a.num_shared_prefixes,
            lora_ids=loras,
            lora_fraction=a.lora_fraction,
        )
    else:
        specs = load_mooncake(a.trace, start=a.trace_start, limit=a.num_requests)
        if rate:
            span = workload_summary(specs)["arrival_span_s"]
            natural = (len(specs) - 1) / span if span > 0 else rate
            specs = time_scaled(specs, natural / rate)
    if a.time_scale != 1.0:
        specs = time_scaled(specs, a.time_scale)
    if a.priority_mix:
        specs = with_priorities(specs, PriorityMix.parse(a.priority_mix), a.seed)
    return specs


def _router_kind(text: str) -> str:
    """`--router`: the core's names, `kv-aware` spellings too; argparse reports a bad one."""
    try:
        return normalize_router_kind(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _numbers(text: str, flag: str, kind: type[float] | type[int]) -> list:
    """A comma-separated list of numbers; a bad item is a ConfigError naming the flag."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r} is invalid: comma-separated {kind.__name__}s expected") from exc


def _precision(scenario: Scenario) -> str:
    m = scenario.model
    return f"{m.weight_bytes:g} B/weight, {m.gemm_dtype} GEMMs, {m.kv_bytes:g} B/KV element"


def run(a: argparse.Namespace) -> int:
    # Everything is checked before the first run starts; errors reach `kvsched.cli.main`.
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    for pol in policies:
        parse_policy(pol)
    scenario = build_scenario(a)
    rates = _numbers(a.sweep_rates, "--sweep-rates", float)
    specs = build_workload(a)
    scenario.device_blocks()
    scenario.host_blocks()
    info = workload_summary(specs)
    behind = f" behind the {scenario.router} router" if scenario.num_replicas > 1 else ""
    print(
        f"{scenario.model.name} ({_precision(scenario)}) on {scenario.num_replicas} x {scenario.tp} x "
        f"{scenario.gpu.name}{behind}: "
        f"{scenario.device_blocks()} device blocks "
        f"x {scenario.tokens_per_block} tokens, {scenario.host_blocks()} host blocks; workload "
        f"{info['requests']} requests, mean prompt {info.get('mean_prompt_len', 0):.0f}, "
        f"mean output {info.get('mean_output_len', 0):.0f}, arrivals over {info.get('arrival_span_s', 0):.0f} s"
    )
    results = []
    for pol in policies:
        sim = scenario.simulator(specs, pol, progress=not a.no_progress, max_concurrency=a.max_concurrency)
        results.append(sim.run())
    print(comparison_table(results))
    for line in ratio_lines(results) + priority_lines(results):
        print(line)
    sweep: dict[str, list] = {}
    for rate in rates:
        rspecs = build_workload(a, rate=rate)
        for pol in policies:
            res = scenario.simulator(rspecs, pol, max_concurrency=a.max_concurrency).run()
            sweep.setdefault(pol, []).append((rate, res))
            print(
                f"rate {rate:8.2f}  {pol:30s} throughput {res.summary['request_throughput']:.2f} "
                f"goodput {res.summary['goodput']:.2f} req/s"
            )
    meta = {"model": scenario.model.name, "gpu": scenario.gpu.name, "tp": scenario.tp, "workload": info}
    if a.json:
        write_json(a.json, results, meta)
        print(f"wrote {a.json}")
    if a.plot_dir:
        from kvsched.sim import plots

        out = Path(a.plot_dir)
        written = [
            plots.latency_cdfs(results, out / "latency_cdf.png"),
            plots.kv_usage(results, out / "kv_usage.png"),
        ]
        if sweep:
            written.append(plots.rate_sweep(sweep, out / "rate_sweep.png"))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
