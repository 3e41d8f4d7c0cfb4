"""Batch-1 decode speed, fp32 against the opt-in weight-only int8 path, and int8's greedy agreement.

fp32 decode at batch 1 reads every weight once per token (~540 MB on SmolLM2-135M), so its speed is
bounded by memory bandwidth; ``quantization="int8"`` reads int8 decoder and head weights instead
(``kvsched.engine.quant``). Printed, all in one run on the default model:

* decode tok/s of one request generating ``--max-tokens`` tokens (EOS ignored) through the engine, for
  fp32, int8, and HF ``generate`` on the same GGUF as the baseline (``--no-hf`` skips it), with ratios;
* a forward of ``--batch`` decoding sequences (fp32 vs int8), since the kernel must not lose at batch;
* greedy agreement of int8 with fp32 on the built-in chat prompts (``kvsched.bench.prompts``): the
  fraction of prompts with identical output and the mean length of the matching prefix.

    python benchmarks/decode.py                       # 128 tokens, 16 prompts x 32 tokens of agreement
    python benchmarks/decode.py --max-tokens 64 --num-prompts 8 --no-hf --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any

QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def _engine(loaded: Any, max_batch_size: int) -> Any:
    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.parts import build_engine_parts

    args = EngineArgs(max_batch_size=max_batch_size, device_kv_bytes=256 << 20, host_kv_bytes=0)
    return Engine(args, parts=build_engine_parts(args, loaded=loaded))


def decode_tok_s(loaded: Any, prompt: list[int], max_tokens: int, reps: int) -> float:
    """Best of ``reps``: output tokens after the first, over the time after the first (TTFT excluded)."""
    from kvsched.core.request import SamplingParams

    ex = _engine(loaded, 1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    best = 0.0
    for _ in range(reps + 1):  # the first run warms up
        rid = ex.add_request(prompt, params)
        ex.step()  # the prefill and the first token
        start = time.perf_counter()
        while ex.has_unfinished_requests():
            ex.step()
        seconds = time.perf_counter() - start
        assert len(ex.pop_output(rid).outputs[0].token_ids) == max_tokens
        best = max(best, (max_tokens - 1) / seconds)
    return best


def greedy_outputs(loaded: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from kvsched.core.request import SamplingParams

    ex = _engine(loaded, len(prompts))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [ex.add_request(p, params) for p in prompts]
    done = {o.request_id: o.outputs[0].token_ids for o in ex.run()}
    return [list(done[i]) for i in ids]


def batch_forward_ms(model: Any, config: Any, batch: int, context: int, reps: int) -> float:
    """Median ms of one forward of ``batch`` decoding sequences after ``context`` cached tokens."""
    from kvsched.core.config import CacheConfig
    from kvsched.engine.forward_batch import ForwardBatch, SeqInput
    from kvsched.engine.kv_storage import TensorKVStorage

    tpb = 16
    per_seq = context // tpb + 1
    cache = CacheConfig(tokens_per_block=tpb, num_device_blocks=batch * per_seq + 1)
    kv = TensorKVStorage(cache, config.num_layers, config.num_kv_heads, config.head_dim)
    seqs = [SeqInput([7], context, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(batch)]
    fb = ForwardBatch.build(seqs, tpb, "cpu")
    model(fb, kv)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(fb, kv)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def hf_decode_tok_s(prompt: list[int], max_tokens: int) -> float:
    """HF ``generate`` on the same GGUF, batch 1, greedy, EOS ignored; decode time only (one run)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvsched.engine.weights.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
        total = time.perf_counter() - start
    return (max_tokens - 1) / max(total - ttft, 1e-9)


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float]:
    """(prompts with identical output, mean length of the prefix int8 shares with fp32)."""
    same = sum(a == b for a, b in zip(ref, got))
    prefixes = []
    for a, b in zip(ref, got):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefixes.append(k)
    return same, statistics.mean(prefixes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=128, help="decode length of the batch-1 run")
    p.add_argument("--reps", type=int, default=2, help="batch-1 runs per engine (best is kept)")
    p.add_argument("--num-prompts", type=int, default=16, help="built-in prompts for the agreement")
    p.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens per prompt for the agreement")
    p.add_argument("--batch", type=int, default=32, help="decoding sequences of the batched forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    a = p.parse_args(argv)

    import torch

    from kvsched.bench.prompts import chat_conversations
    from kvsched.engine.quant import quantize_model
    from kvsched.engine.weights.loader import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model, config, tok = load_model(None)
    q_model = copy.deepcopy(model)
    n_q = quantize_model(q_model, "int8")
    fp32, int8 = (model, config, tok), (q_model, config, tok)
    prompt = tok.encode_chat(QUESTION)
    load0 = os.getloadavg()[0]
    print(
        f"SmolLM2-135M GGUF, threads={torch.get_num_threads()}, int8: {n_q} linears "
        f"(decoder projections + LM head; embedding fp32), load average {load0:.1f} at the start"
    )

    rows = [("kvsched fp32", decode_tok_s(fp32, prompt, a.max_tokens, a.reps))]
    rows.append(("kvsched int8", decode_tok_s(int8, prompt, a.max_tokens, a.reps)))
    if not a.no_hf:
        try:
            rows.append(("HF generate fp32", hf_decode_tok_s(prompt, a.max_tokens)))
        except Exception as exc:  # reported, not raised: the kvsched figures stand alone
            print(f"HF baseline failed: {type(exc).__name__}: {exc}")
    base = rows[0][1]
    print(f"\nbatch-1 decode, {a.max_tokens} tokens ({len(prompt)}-token prompt), TTFT excluded")
    print(f"{'engine':<18} {'tok/s':>8} {'x fp32':>7}")
    for name, tps in rows:
        print(f"{name:<18} {tps:>8.1f} {tps / base:>7.2f}")

    ms32 = batch_forward_ms(model, config, a.batch, 256, 5)
    ms8 = batch_forward_ms(q_model, config, a.batch, 256, 5)
    print(f"\nforward of {a.batch} decoding sequences (context 256), median of 5")
    print(f"fp32 {ms32:.1f} ms, int8 {ms8:.1f} ms: int8 x{ms32 / ms8:.2f} the speed of fp32")

    prompts = [tok.encode_chat(c) for c in chat_conversations(a.num_prompts)]
    ref = greedy_outputs(fp32, prompts, a.agree_tokens)
    got = greedy_outputs(int8, prompts, a.agree_tokens)
    same, prefix = agreement(ref, got)
    print(
        f"\ngreedy agreement int8 vs fp32, {len(prompts)} built-in prompts x {a.agree_tokens} tokens: "
        f"identical {same}/{len(prompts)} ({same / len(prompts):.0%}), mean matching prefix "
        f"{prefix:.1f} tokens ({prefix / a.agree_tokens:.0%})"
    )
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2-core machine shared with other jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
