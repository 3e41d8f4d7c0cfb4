"""`kvsched bench serve`: flags (vLLM's names where they exist) and the run itself.

Registering the flags imports nothing heavy; httpx, numpy and tqdm load when the command runs.
"""

from __future__ import annotations

import argparse
import math

from kvsched.bench.datasets import DATASETS, DatasetConfig, build_dataset
from kvsched.core.errors import ConfigError


def _rate(text: str) -> float:
    value = float(text)  # accepts "inf"
    if value <= 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {text}")
    return value


def _percentiles(text: object) -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--metric-percentiles {text!r} is invalid: use numbers like 50,90,99") from exc
    if any(not 0 < v <= 100 for v in values):
        raise ConfigError(f"--metric-percentiles {text!r} is invalid: each must be in (0, 100]")
    return values


def add_serve_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` under the ``bench`` subcommand's subparsers."""
    p = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (vLLM-style report)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    p.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS, default="random")
    p.add_argument("--trace-path", "--dataset-path", dest="trace_path", default=None, help="Mooncake JSONL")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s, or inf (all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--use-trace-timestamps", action="store_true", help="mooncake: replay by timestamps")
    p.add_argument("--time-scale", type=float, default=1.0, help="mooncake: multiply trace times")
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    p.add_argument("--metric-percentiles", default="99", help="comma list, e.g. 90,99")
    p.add_argument("--result-json", default=None, help="write metrics (and config) as JSON here")
    p.add_argument("--save-detailed", action="store_true", help="include per-request rows in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-format", choices=("text", "token-ids"), default="text")
    p.add_argument("--vocab-size", type=int, default=32000, help="token-ids format: id range")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--length-scale", type=float, default=1.0, help="mooncake: scale token lengths")
    p.add_argument("--max-input-len", type=int, default=None)
    p.add_argument("--max-output-len", type=int, default=None)
    p.add_argument(
        "--priority-mix",
        default=None,
        metavar="P:W,...",
        help="give each request a priority drawn with these weights, sent as the body's 'priority' "
        "(e.g. 0:0.8,10:0.2; kvsched serves higher first with --priority-mode, vLLM lower first)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let EOS end outputs early")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--skip-initial-test", action="store_true")
    p.set_defaults(func=run)


def _first_model(base_url: str) -> str:
    import httpx

    from kvsched.bench.runner import ServerUnreachableError

    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=30.0, trust_env=False)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ServerUnreachableError(
            f"cannot list models at {base_url}/v1/models ({exc}); pass --model"
        ) from exc


def run(args: argparse.Namespace) -> int:
    from kvsched.bench.client import RequestSpec
    from kvsched.bench.metrics import parse_goodput
    from kvsched.bench.report import format_table, result_dict, write_json
    from kvsched.bench.runner import LoadConfig, run_benchmark

    # Errors are reported once, by kvsched.cli.main: a kvsched error is one line and status 2.
    base = args.base_url.rstrip("/")
    model = args.model or _first_model(base)
    endpoint = "chat" if "chat" in args.endpoint else "completions"
    spec = RequestSpec(
        api_url=base + args.endpoint,
        model=model,
        endpoint=endpoint,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
    )
    dcfg = DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        seed=args.seed,
        prompt_format=args.prompt_format,
        vocab_size=args.vocab_size,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        trace_path=args.trace_path,
        length_scale=args.length_scale,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        time_scale=args.time_scale,
        priority_mix=args.priority_mix,
    )
    load = LoadConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        use_trace_timestamps=args.use_trace_timestamps,
        seed=args.seed,
        timeout_s=args.timeout,
        progress=not args.disable_tqdm,
        initial_test=not args.skip_initial_test,
    )
    slos = parse_goodput(args.goodput)
    percentiles = _percentiles(args.metric_percentiles)
    samples = build_dataset(dcfg)
    metrics, results = run_benchmark(spec, samples, load, slos=slos, percentiles=percentiles)
    print(format_table(metrics))
    if args.result_json:
        config = {
            "base_url": base,
            "endpoint": args.endpoint,
            "model": model,
            "dataset": args.dataset,
            "num_prompts": args.num_prompts,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "goodput": slos,
            "priority_mix": args.priority_mix,
        }
        write_json(args.result_json, result_dict(metrics, config, results if args.save_detailed else None))
    return 0 if metrics.completed else 1
