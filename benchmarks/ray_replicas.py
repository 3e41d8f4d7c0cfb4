"""Real engines on Ray: `kvsched serve --replicas N --router R` for each router, loaded with `kvsched bench
serve --dataset prefix`; prints the prefix-cache hit rate (from the server's /metrics), throughput and
TTFT per router, and ratios to round-robin measured in the same run.

    python benchmarks/ray_replicas.py --num-prompts 60 --replicas 2

Each router gets a fresh server (cold caches). Needs the `ray` extra. On a shared or small machine the
absolute figures are noisy; compare the ratios, and run it more than once.

The defaults make routing matter: the prefix dataset cycles over its prefixes in order, so with an even
number of prefixes and 2 replicas round-robin would send each prefix to the same replica every time (by
accident); 15 prefixes break that. The device KV pool (120 MB: ~160 SmolLM2 blocks of 16 tokens, no
host tier) holds about half of the 15 x 256 prefix tokens, so a replica that sees every prefix evicts.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvsched.core.routing import ROUTER_KINDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefix_tokens(url: str) -> tuple[float, float]:
    """(queried, hit) prompt tokens summed over the replicas, from /metrics."""
    text = httpx.get(url + "/metrics", trust_env=False, timeout=30).text
    total = {"queries": 0.0, "hits": 0.0}
    for kind in total:
        for m in re.finditer(rf"^kvsched:replica_prefix_cache_{kind}_total\{{[^}}]*\}} (\S+)$", text, re.M):
            total[kind] += float(m.group(1))
    return total["queries"], total["hits"]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", trust_env=False, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the server was not healthy within {timeout_s:g} s")


def run_router(router: str, args: argparse.Namespace, workdir: Path) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "kvsched.cli", "serve", "--port", str(port), "--log-level", "warning"]
    serve += ["--replicas", str(args.replicas), "--router", router, *args.engine_flags]
    proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(url, proc, args.start_timeout)
        q0, h0 = _prefix_tokens(url)
        out = workdir / f"{router}.json"
        bench = [sys.executable, "-m", "kvsched.cli", "bench", "serve", "--base-url", url]
        bench += ["--dataset", "prefix", "--num-prompts", str(args.num_prompts), "--prefix-len"]
        bench += [str(args.prefix_len), "--num-prefixes", str(args.num_prefixes), "--random-input-len"]
        bench += [str(args.input_len), "--random-output-len", str(args.output_len), "--max-concurrency"]
        bench += [str(args.max_concurrency), "--disable-tqdm", "--result-json", str(out)]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        q1, h1 = _prefix_tokens(url)
        res = json.loads(out.read_text())
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "router": router,
        "hit_rate": (h1 - h0) / max(1.0, q1 - q0),
        "req_s": res["request_throughput"],
        "tok_s": res["total_token_throughput"],
        "ttft_p50": res["ttft_ms"]["median"],
        "ttft_p99": res["ttft_ms"]["percentiles"]["p99"],
        "failed": res["failed"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--routers", default=",".join(ROUTER_KINDS))
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-prefixes", type=int, default=15)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument(
        "--engine-flags",
        default="--device-kv-bytes 120000000 --host-kv-bytes 0",
        help="extra `kvsched serve` flags, one string",
    )
    args = p.parse_args()
    args.engine_flags = args.engine_flags.split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for router in args.routers.split(","):
            rows.append(run_router(router.strip(), args, Path(tmp)))
            print(f"done: {rows[-1]}", file=sys.stderr)
    base = next((r for r in rows if r["router"] == "round_robin"), rows[0])
    print(f"{args.replicas} replicas, {args.num_prompts} prompts, dataset prefix ({args.num_prefixes} prefixes "
          f"of {args.prefix_len} tokens), max concurrency {args.max_concurrency}; ratios to {base['router']}")  # fmt: skip
    print(f"{'router':<14}{'hit rate':>9}{'req/s':>8}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
          f"{'x req/s':>9}{'x TTFT p50':>11}{'failed':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['router']:<14}{r['hit_rate']:>9.3f}{r['req_s']:>8.3f}{r['tok_s']:>9.1f}{r['ttft_p50']:>13.0f}"
            f"{r['ttft_p99']:>13.0f}{r['req_s'] / base['req_s']:>9.2f}"
            f"{r['ttft_p50'] / max(1e-9, base['ttft_p50']):>11.2f}{r['failed']:>8}"
        )


if __name__ == "__main__":
    main()
