"""`kvsched bench offline`: the built-in chat prompts through the engine, then a summary table.

``add_arguments`` imports nothing heavy (the CLI registers it at start-up); ``run`` loads the engine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvsched.engine.engine_args import add_engine_flags, engine_args_from_namespace

# Bench defaults: sized to finish in about a minute on 2 CPU cores with the default model, with a
# device pool small enough that the scheduler suspends requests to the host tier now and then.
_BENCH_DEFAULTS = {"max_batch_size": 32, "device_kv_bytes": 128 << 20, "host_kv_bytes": 1 << 30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts to run (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--no-tqdm", action="store_true", help="no progress bar")
    add_engine_flags(parser)
    parser.set_defaults(**_BENCH_DEFAULTS)


@dataclass(slots=True)
class OfflineReport:
    """The figures the table prints (also handy for the scripts under benchmarks/)."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int
    duration_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    peak_device_usage: float
    peak_host_blocks: int
    num_device_blocks: int
    num_host_blocks: int
    suspends: int
    resumes: int
    preemptions: int
    reuse_hit_rate: float
    reused_tokens: int
    steps: int
    # Speculative decoding (0 without): verify steps, drafts proposed, drafts accepted.
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def accepted_tokens_per_step(self) -> float:
        """Draft tokens accepted per speculative decode step (it also adds the target's own token)."""
        return self.spec_accepted_tokens / self.spec_steps if self.spec_steps else 0.0

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def table(self) -> str:
        rows = [
            ("Requests", f"{self.num_requests}"),
            ("Engine steps", f"{self.steps}"),
            ("Prompt tokens", f"{self.prompt_tokens}"),
            ("Output tokens", f"{self.output_tokens}"),
            ("Duration (s)", f"{self.duration_s:.2f}"),
            ("Output tokens/s", f"{self.output_throughput:.1f}"),
            ("Total tokens/s", f"{(self.prompt_tokens + self.output_tokens) / self.duration_s:.1f}"),
            ("TTFT p50 / p99 (ms)", f"{_pct(self.ttft_s, 50):.0f} / {_pct(self.ttft_s, 99):.0f}"),
            ("TPOT p50 / p99 (ms)", f"{_pct(self.tpot_s, 50):.1f} / {_pct(self.tpot_s, 99):.1f}"),
            (
                "KV device peak",
                f"{self.peak_device_usage:.0%} of {self.num_device_blocks} blocks",
            ),
            ("KV host peak", f"{self.peak_host_blocks} of {self.num_host_blocks} blocks"),
            ("Suspends / resumes", f"{self.suspends} / {self.resumes}"),
            ("Recompute preemptions", f"{self.preemptions}"),
            ("Prefix reuse hit rate", f"{self.reuse_hit_rate:.1%} ({self.reused_tokens} tokens reused)"),
        ]
        if self.spec_steps:
            rows += [
                ("Speculative acceptance", f"{self.acceptance_rate:.1%} of {self.spec_draft_tokens} drafts"),
                ("Accepted drafts / step", f"{self.accepted_tokens_per_step:.2f}"),
            ]
        width = max(len(k) for k, _ in rows)
        line = "=" * (width + 26)
        body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
        return f"{line}\n{'kvsched offline benchmark':^{len(line)}}\n{line}\n{body}\n{line}"


def _pct(values: Sequence[float], q: float) -> float:
    """Percentile in milliseconds (nearest-rank on sorted values; 0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx] * 1000.0


def run_offline(
    llm,
    num_prompts: int,
    max_tokens: int,
    temperature: float = 0.0,
    use_tqdm: bool = True,
    conversations: Sequence[Sequence[dict[str, str]]] | None = None,
) -> OfflineReport:
    """Run ``conversations`` (default: the built-in ones) through ``llm`` (an :class:`LLM`) and measure."""
    from kvsched.bench.prompts import chat_conversations
    from kvsched.core.request import SamplingParams

    if conversations is None:
        conversations = chat_conversations(num_prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=False)
    engine = llm.engine
    start = time.monotonic()
    outputs = llm.chat(conversations, params, use_tqdm=use_tqdm)
    duration = time.monotonic() - start
    kv_stats = engine.kv.stats()
    stats = engine.stats
    return OfflineReport(
        num_requests=len(outputs),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        duration_s=duration,
        ttft_s=[o.metrics.ttft for o in outputs if o.metrics.ttft is not None],
        tpot_s=[o.metrics.tpot for o in outputs if o.metrics.tpot is not None],
        peak_device_usage=stats.peak_device_usage,
        peak_host_blocks=stats.peak_host_blocks_used,
        num_device_blocks=engine.kv.num_device_blocks,
        num_host_blocks=engine.kv.num_host_blocks,
        suspends=kv_stats.num_suspends,
        resumes=kv_stats.num_resumes,
        preemptions=stats.num_preempted,
        reuse_hit_rate=kv_stats.reuse_hit_rate,
        reused_tokens=kv_stats.reuse_hit_tokens,
        steps=stats.num_steps,
        spec_steps=stats.num_speculative_steps,
        spec_draft_tokens=stats.num_draft_tokens,
        spec_accepted_tokens=stats.num_accepted_draft_tokens,
    )


def run(args: argparse.Namespace) -> int:
    from kvsched.engine.llm import LLM

    if args.num_prompts < 1 or args.max_tokens < 1:
        raise SystemExit("kvsched bench offline: --num-prompts and --max-tokens must be >= 1")
    engine_args = engine_args_from_namespace(args)
    load_start = time.monotonic()
    llm = LLM(**{f: getattr(engine_args, f) for f in engine_args.__slots__})
    print(
        f"loaded {engine_args.model or 'SmolLM2-135M-Instruct (default)'} in "
        f"{time.monotonic() - load_start:.1f}s; scheduler={engine_args.scheduler}"
    )
    report = run_offline(llm, args.num_prompts, args.max_tokens, args.temperature, not args.no_tqdm)
    print(report.table())
    return 0
