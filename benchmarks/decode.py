"""Batch-1 decode speed, fp32 against the opt-in weight-only int8 and int4 paths, and their greedy agreement.

fp32 decode at batch 1 reads every weight once per token (the MB per token of each model is printed),
so its speed is bounded by memory bandwidth; ``quantization="int8"`` / ``"int4"`` read quantized
weights instead (``kvsched.engine.quant``). Printed, all in one run on the default model:

* decode tok/s of one request generating ``--max-tokens`` tokens (EOS ignored) through the engine, for
  fp32, fp32 with the prepacked linears off (``F.linear``), int8, int4, and HF ``generate`` on the
  same GGUF as the baseline (``--no-hf`` skips it), with ratios; every engine takes its turn in each
  repetition, ``F.linear`` included. Measured with the defaults (128 tokens), 2 threads, idle: fp32
  28.7 tok/s, ``F.linear`` 18.3 (0.64x);
* a forward of ``--batch`` decoding sequences (fp32 vs int8 vs int4), since the kernel must not lose at
  batch;
* the candidate kernels on one decoder layer's projections at batch 1 and ``--batch``, the engine's
  default fp32 path (oneDNN-prepacked, ``engine/model/packed.py``) among them (``--kernel-reps 0``
  skips them). Measured, 1 thread, 20 reps, loaded 2-core machine, ratio to ``F.linear``: fp32
  prepacked 0.85x at batch 1, 1.13x / 1.22x / 1.19x at ``--batch`` 8 / 32 / 64;
* greedy agreement of int8 and int4 with fp32 on the built-in chat prompts (``kvsched.bench.prompts``):
  the fraction of prompts with identical output and the mean length of the matching prefix.

On a busy machine pass ``--threads 1``: with two OpenMP threads per process and more runnable
processes than cores, threads spin waiting for each other and the figures say little.

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


def decode_tok_s(
    loaded: dict[str, Any],
    prompt: list[int],
    max_tokens: int,
    reps: int,
    unpacked: frozenset[str] = frozenset(),
) -> dict:
    """Per model: the best of ``reps`` of output tokens after the first over the wall time after the
    first (TTFT excluded), and the same tokens per CPU second of this process (steadier on a busy
    machine). The models take turns within each rep, so a change of machine load hits them alike.
    The turns of the names in ``unpacked`` run with the prepacked linears off (``F.linear``); the
    switch, and the repacking after it, happen before the untimed prefill of a turn."""
    from kvsched.core.request import SamplingParams
    from kvsched.engine.model.packed import set_prepacking

    engines = {name: _engine(m, 1) for name, m in loaded.items()}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    best = {name: (0.0, 0.0) for name in engines}
    previous = set_prepacking(True)
    try:
        for _ in range(reps + 1):  # the first round warms up
            for name, ex in engines.items():
                set_prepacking(name not in unpacked)
                best[name] = _best(best[name], _decode_once(ex, prompt, params, max_tokens))
    finally:
        set_prepacking(previous)
    return best


def _best(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return max(a[0], b[0]), max(a[1], b[1])


def _decode_once(ex: Any, prompt: list[int], params: Any, max_tokens: int) -> tuple[float, float]:
    """One request: (tokens after the first per wall second, per CPU second), TTFT excluded."""
    rid = ex.add_request(prompt, params)
    ex.step()  # the prefill and the first token
    start, cpu = time.perf_counter(), time.process_time()
    while ex.has_unfinished_requests():
        ex.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(ex.pop_output(rid).outputs[0].token_ids) == max_tokens
    return (max_tokens - 1) / seconds, (max_tokens - 1) / cpu


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


def hf_decode_tok_s(prompt: list[int], max_tokens: int) -> tuple[float, float]:
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
        start, cpu = time.perf_counter(), time.process_time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft, ttft_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    return (max_tokens - 1) / max(total - ttft, 1e-9), (max_tokens - 1) / max(total_cpu - ttft_cpu, 1e-9)


def kernel_us(batch: int, reps: int) -> dict[str, float]:
    """Median µs of one decoder layer's seven projections (SmolLM2 shapes) per candidate kernel, on
    random weights: why ``engine/quant.py`` uses ``_weight_int8pack_mm`` with bf16 activations."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    ws = [torch.randn(n, k, generator=gen) * 0.05 for n, k in shapes]
    xs = {k: torch.randn(batch, k, generator=gen) for _, k in shapes}
    xb = {k: x.bfloat16() for k, x in xs.items()}
    qs = []
    for w in ws:
        scale = w.abs().amax(1) / 127
        qs.append((torch.round(w / scale[:, None]).to(torch.int8), scale))
    qt = [(q.t().contiguous(), s) for q, s in qs]  # [K, N] for _int_mm
    wb = [w.bfloat16() for w in ws]
    mm8 = torch.ops.aten._weight_int8pack_mm
    from kvsched.engine.model.packed import packed
    from kvsched.engine.quant import Int4Linear

    int4 = [Int4Linear(nn.Linear(w.shape[1], w.shape[0], bias=False)) for w in ws]
    prepacked = []  # the engine's default fp32 CPU path (engine/model/packed.py), one weight each
    for w in ws:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
        lin.weight.data = w
        prepacked.append((packed(lin, "w", (lin,), release=False), w.shape[1]))

    def int_mm() -> None:  # int8 activations, one scale per token
        for q, s in qt:
            x = xs[q.shape[0]]
            xs_ = x.abs().amax(-1, keepdim=True) / 127
            torch._int_mm(torch.round(x / xs_).to(torch.int8), q).float().mul_(xs_ * s)

    cands = {
        "fp32 linear": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in ws],
        "fp32 prepacked": lambda: [p(xs[k]) for p, k in prepacked],
        "bf16 linear": lambda: [torch.nn.functional.linear(xb[w.shape[1]], w) for w in wb],
        "int8pack fp32 act": lambda: [mm8(xs[q.shape[1]], q, s) for q, s in qs],
        "int8pack bf16 act": lambda: [mm8(xb[q.shape[1]], q, s.bfloat16()) for q, s in qs],
        "_int_mm int8 act": int_mm,
        "int4pack bf16 act": lambda: [m(xs[m.in_features]) for m in int4],
    }
    if any(p is None for p, _ in prepacked):  # no oneDNN in this torch build: nothing to compare
        del cands["fp32 prepacked"]
    out: dict[str, list[float]] = {name: [] for name in cands}
    with torch.inference_mode():
        for fn in cands.values():
            fn()
        for _ in range(reps):  # interleaved, so a burst of load hits every candidate alike
            for name, fn in cands.items():
                start = time.perf_counter()
                fn()
                out[name].append(1e6 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in out.items()}


def weight_mb_per_token(model: Any) -> float:
    """MB of linear weights (fp32 matrices, or codes + scales) a decode step reads; the embedding table
    is not counted (one row per token), a head tied to it is."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if not hasattr(mod, "in_features"):  # nn.Linear, Int8Linear, Int4Linear
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 1e6


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float]:
    """(prompts with identical output, mean length of the prefix the two share)."""
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
    p.add_argument(
        "--kernel-reps", type=int, default=20, help="repetitions of the kernel comparison (0: skip)"
    )
    a = p.parse_args(argv)

    import torch

    from kvsched.bench.prompts import chat_conversations
    from kvsched.engine.quant import quantize_model
    from kvsched.engine.weights.loader import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model, config, tok = load_model(None)
    models = {"fp32": model}
    for kind in ("int8", "int4"):
        models[kind] = copy.deepcopy(model)
        quantize_model(models[kind], kind)
    prompt = tok.encode_chat(QUESTION)
    print(
        f"SmolLM2-135M GGUF, threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at "
        "the start. int8: decoder projections + LM head; int4: decoder projections (LM head fp32); "
        "embedding fp32. MB of weights read per decode token: "
        + ", ".join(f"{k} {weight_mb_per_token(m):.0f}" for k, m in models.items())
    )

    # fp32 a second time with the prepacked linears off (F.linear, MKL's sgemm), taking its turns
    # beside the others: what prepacking gains end to end.
    loaded = {k: (m, config, tok) for k, m in models.items()}
    loaded = {"fp32": loaded["fp32"], "fp32 F.linear": loaded["fp32"], **loaded}
    speeds = decode_tok_s(loaded, prompt, a.max_tokens, a.reps, unpacked=frozenset({"fp32 F.linear"}))
    rows = [(f"kvsched {k}", v) for k, v in speeds.items()]
    if not a.no_hf:
        try:
            rows.append(("HF generate fp32", hf_decode_tok_s(prompt, a.max_tokens)))
        except Exception as exc:  # reported, not raised: the kvsched figures stand alone
            print(f"HF baseline failed: {type(exc).__name__}: {exc}")
    (base, base_cpu) = rows[0][1]
    print(
        f"\nbatch-1 decode, {a.max_tokens} tokens ({len(prompt)}-token prompt), TTFT excluded, best of {a.reps}"
    )
    print(f"{'engine':<22} {'tok/s':>8} {'x fp32':>7} {'tok/CPU s':>10} {'x fp32':>7}")
    for name, (tps, cps) in rows:
        print(f"{name:<22} {tps:>8.1f} {tps / base:>7.2f} {cps:>10.1f} {cps / base_cpu:>7.2f}")

    ms = {k: batch_forward_ms(m, config, a.batch, 256, 5) for k, m in models.items()}
    print(
        f"\nforward of {a.batch} decoding sequences (context 256), median of 5: "
        + ", ".join(f"{k} {v:.1f} ms (x{ms['fp32'] / v:.2f})" for k, v in ms.items())
    )

    if a.kernel_reps:
        print("\nkernels, one decoder layer's projections (random weights), median µs, x = speed vs fp32")
        for m in (1, a.batch):
            us = kernel_us(m, a.kernel_reps)
            fp = us["fp32 linear"]
            print(f"  batch {m:>3}: " + ", ".join(f"{k} {v:.0f} (x{fp / v:.2f})" for k, v in us.items()))

    prompts = [tok.encode_chat(c) for c in chat_conversations(a.num_prompts)]
    ref = greedy_outputs((model, config, tok), prompts, a.agree_tokens)
    print(f"\ngreedy agreement with fp32, {len(prompts)} built-in prompts x {a.agree_tokens} tokens:")
    for kind in ("int8", "int4"):
        same, prefix = agreement(ref, greedy_outputs((models[kind], config, tok), prompts, a.agree_tokens))
        print(
            f"  {kind}: identical {same}/{len(prompts)} ({same / len(prompts):.0%}), mean matching prefix "
            f"{prefix:.1f} tokens ({prefix / a.agree_tokens:.0%})"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
