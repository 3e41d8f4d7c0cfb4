"""Offline throughput: kvsched vs HF transformers (static batching, and continuous batching if present).

The same chat prompts (token ids from our tokenizer) and the same weights (HF loads the same GGUF with
``gguf_file=``) go through each engine, greedy. Each engine runs in its own spawned process so its peak
RSS is its own; load time is excluded from tokens/s. Prints output tokens/s and CPU time per output
token (steadier than wall time on a busy machine), the ratios (kvsched x: how many times kvsched is
better), peak RSS, and how many greedy outputs agree with kvsched's; then kvsched's step profile (time
per step in forward, attention gather, sampling, detokenize, scheduling, step update and the rest;
``EngineArgs.profile_steps``, off by default in the engine, on here unless ``--no-profile``).

    python benchmarks/engine_throughput.py                        # 64 prompts x 128 new tokens
    python benchmarks/engine_throughput.py --num-prompts 16 --max-tokens 32 --skip hf-cb
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _prompts(num: int) -> tuple[list[list[int]], tuple[int, ...]]:
    """The built-in chat prompts as token ids (chat template applied), and the EOS ids."""
    from kvsched.bench.prompts import chat_conversations
    from kvsched.engine.tokenizer import Tokenizer
    from kvsched.engine.weights.gguf_file import GGUFFile
    from kvsched.engine.weights.loader import default_model_path

    tok = Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata)
    return [tok.encode_chat(c) for c in chat_conversations(num)], tok.eos_token_ids


def _trim(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    """Generated tokens up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def run_kvsched(
    prompts: list[list[int]], max_tokens: int, eos: tuple[int, ...], opts: dict[str, Any]
) -> dict:
    from kvsched import LLM, SamplingParams

    llm = LLM(**opts)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2), use_tqdm=False)
    prof = llm.engine.profile
    if prof is not None:
        prof.reset()  # the warm-up step is not part of the figures
    start, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        use_tqdm=False,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    tokens = [o.outputs[0].token_ids for o in outs]
    kv = llm.engine.kv.stats()
    extra = f"suspends={kv.num_suspends} resumes={kv.num_resumes} reuse_hit_rate={kv.reuse_hit_rate:.1%}"
    result = {"tokens": tokens, "seconds": seconds, "cpu_s": cpu, "rss_mb": _peak_rss_mb(), "extra": extra}
    if prof is not None:
        result["profile"] = prof.as_dict()
    return result


def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from kvsched.engine.weights.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def run_hf_static(
    prompts: list[list[int]], max_tokens: int, eos: tuple[int, ...], opts: dict[str, Any]
) -> dict:
    import torch

    model = _hf_model()
    batch = opts["batch_size"]
    pad = eos[0]
    tokens: list[list[int]] = []
    start, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(group):  # left padding, as decoder-only batching needs
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
            )
        tokens += [_trim(row[width:].tolist(), eos) for row in out]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_s": cpu,
        "rss_mb": _peak_rss_mb(),
        "extra": f"batch={batch}",
    }


def run_hf_cb(prompts: list[list[int]], max_tokens: int, eos: tuple[int, ...], opts: dict[str, Any]) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = _hf_model()
    gen = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0]
    )
    cb = ContinuousBatchingConfig(
        num_blocks=opts["num_blocks"], max_batch_tokens=opts["max_batch_tokens"], page_size=256
    )
    start, cpu0 = time.perf_counter(), time.process_time()
    result = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    outs = list(result.values())
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for o in outs:
        by_prompt[tuple(o.prompt_ids)] = _trim(list(o.generated_tokens), eos)
    tokens = [by_prompt.get(tuple(p), []) for p in prompts]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_s": cpu,
        "rss_mb": _peak_rss_mb(),
        "extra": f"num_blocks={opts['num_blocks']}",
    }


RUNNERS = {"kvsched": run_kvsched, "hf-static": run_hf_static, "hf-cb": run_hf_cb}


def _child(name: str, args: tuple, queue: Any, threads: int) -> None:
    if threads:  # the same for every engine; the variable also reaches threads an engine starts itself
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    try:
        queue.put(RUNNERS[name](*args))
    except Exception as exc:  # reported, not raised: one engine failing must not hide the others
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(name: str, *args: Any, threads: int = 0) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64, help="kvsched max batch size")
    p.add_argument("--hf-batch-size", type=int, default=16, help="HF static batch size")
    p.add_argument("--skip", action="append", default=[], choices=sorted(RUNNERS), help="engines to skip")
    p.add_argument("--no-profile", action="store_true", help="do not time kvsched's step phases")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of every engine (0 = torch's default); 1 is steadier on a machine others load",
    )
    a = p.parse_args(argv)
    prompts, eos = _prompts(a.num_prompts)
    total_prompt = sum(len(x) for x in prompts)
    print(
        f"{len(prompts)} prompts ({total_prompt} prompt tokens), max {a.max_tokens} new tokens, greedy; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (each engine runs alone, one after "
        "another: on a loaded machine compare the CPU ms/tok column)"
    )
    opts = {
        "kvsched": {
            "max_batch_size": a.max_batch_size,
            "max_num_tokens": 2048,
            "profile_steps": not a.no_profile,
        },
        "hf-static": {"batch_size": a.hf_batch_size},
        "hf-cb": {"num_blocks": 64, "max_batch_tokens": 2048},
    }
    results: dict[str, dict] = {}
    for name in RUNNERS:
        if name in a.skip:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run_isolated(name, prompts, a.max_tokens, eos, opts[name], threads=a.threads)
    base = results.get("kvsched", {})
    print(
        f"\n{'engine':<10} {'out tok':>8} {'seconds':>8} {'out tok/s':>10} {'kvsched x':>10} "
        f"{'CPU ms/tok':>10} {'kvsched x':>10} {'peak RSS MB':>12}  greedy match  notes"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} failed: {r['error']}")
            continue
        n = sum(len(t) for t in r["tokens"])
        tps = n / r["seconds"]
        cpu_ms = 1000 * r["cpu_s"] / n
        ratio = cpu_ratio = match = ""
        if base and "error" not in base:
            base_n = sum(len(t) for t in base["tokens"])
            ratio = f"{base_n / base['seconds'] / tps:.2f}"
            cpu_ratio = f"{cpu_ms / (1000 * base['cpu_s'] / base_n):.2f}"
            same = sum(x == y for x, y in zip(base["tokens"], r["tokens"]))
            match = f"{same}/{len(prompts)}"
        print(
            f"{name:<10} {n:>8} {r['seconds']:>8.1f} {tps:>10.1f} {ratio:>10} {cpu_ms:>10.1f} {cpu_ratio:>10} "
            f"{r['rss_mb']:>12.0f}  "
            f"{match:>12}  {r['extra']}"
        )
    if "profile" in base:
        from kvsched.engine.step_profile import format_profile

        print(f"\nkvsched step profile (wall time; load average {os.getloadavg()[0]:.1f} at the end):")
        print(format_profile(base["profile"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
