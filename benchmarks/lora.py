"""Multi-LoRA throughput: output tokens/s through the engine with 1, 4 and 16 distinct adapters against the
base model alone, over the same request mix, in one run.

A random Llama checkpoint is written to a temp dir (as the tests' ``tiny_llama_dir``) and adapters are made
with peft with random non-zero A and B, saved in the HF PEFT format and loaded by name
(``lora_modules``). Every request of a LoRA run uses an adapter (request i gets adapter i mod k); the base
run serves the same prompts on an engine without adapters. Token-id prompts, greedy, EOS ignored, so every
run produces the same number of tokens. Prints tokens/s, CPU time per output token (steadier than wall time
on a busy machine) and the ratios to the base model.

LoRA-aware ordering: the schedulers sort a batch by adapter when it holds LoRA requests
(``core/scheduler/common.py: sort_output``). The "unordered" runs wrap the engine's scheduler so that each
step's requests go back to arrival order (non-last chunks still first) before the forward: the same
decisions, without the adapter order. The forward groups tokens by adapter either way
(``ForwardBatch.lora_groups``), so the two should cost the same; the column shows it.

    python benchmarks/lora.py                                 # 64 prompts x 32 new tokens, rank 16
    python benchmarks/lora.py --num-prompts 16 --max-tokens 8 --hidden-size 64
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.hf import load_hf_folder

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_checkpoint(path: Path, hidden: int, layers: int, vocab: int) -> None:
    """A random-weight Llama in the HF format (config.json + safetensors)."""
    import transformers

    heads = max(1, hidden // 32)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)


def write_adapters(base: Path, root: Path, count: int, rank: int, targets: list[str]) -> dict[str, str]:
    """`count` peft adapters with random non-zero weights; name -> directory."""
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per adapter, not one per weight load
    # peft calls a transformers API deprecated there (is_gradient_checkpointing): not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    out: dict[str, str] = {}
    for i in tqdm(range(count), desc="adapters", unit="adapter"):
        model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        wrapped = peft.get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        wrapped.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = str(root / f"a{i}")
    return out


class ArrivalOrder:
    """A scheduler wrapper that undoes the adapter order of each step (benchmark only)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def schedule(self, active_requests, inflight_request_ids=frozenset()):  # type: ignore[no-untyped-def]
        out = self.inner.schedule(active_requests, inflight_request_ids)
        out.generation_requests.sort(key=lambda r: r.request_id)
        out.context_requests.sort(key=lambda r: (r.is_last_context_chunk, r.request_id))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_once(
    base: Path,
    adapters: dict[str, str],
    prompts: list[list[int]],
    max_tokens: int,
    label: str,
    opts: dict,
    ordered: bool = True,
) -> dict[str, Any]:
    """Serve every prompt (request i with adapter i mod len(adapters); none if empty); tokens/s."""
    args = EngineArgs(model=str(base), lora_modules=adapters or None, **opts)
    model, config = load_hf_folder(base, dtype=torch.float32, device="cpu")
    ex = Engine(args, parts=build_engine_parts(args, loaded=(model, config, None)))
    if not ordered:
        ex.loop.scheduler = ArrivalOrder(ex.loop.scheduler)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    names = sorted(adapters)
    ex.add_request(prompts[0][:8], SamplingParams(max_tokens=2), lora_id=names[0] if names else None)
    ex.run()  # warm-up: first forward, first adapter copy
    start, cpu0 = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        ex.add_request(p, sp, lora_id=names[i % len(names)] if names else None)
    produced = 0
    with tqdm(total=len(prompts) * max_tokens, desc=label, unit="tok", leave=False) as bar:
        while ex.has_unfinished_requests():
            n = sum(len(o.new_token_ids) for o in ex.step())
            produced += n
            bar.update(n)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"run": label, "tokens": produced, "tok_s": produced / wall, "cpu_ms_tok": 1e3 * cpu / produced}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", default="16:96", help="uniform MIN:MAX prompt tokens")
    ap.add_argument("--adapters", default="1,4,16", help="distinct adapter counts to run")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help=f"of {','.join(TARGETS)}")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        ap.error(f"--targets {bad} are invalid: each one of {','.join(TARGETS)}")
    counts = [int(c) for c in a.adapters.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        ap.error(f"--adapters {a.adapters!r} is invalid: positive integers, comma-separated")
    lo, hi = (int(x) for x in a.prompt_len.split(":"))
    torch.set_num_threads(a.threads)
    vocab = 512
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(a.num_prompts)]
    opts = {"max_batch_size": a.max_batch_size, "tokens_per_block": 16, "max_model_len": 1024}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        write_checkpoint(base, a.hidden_size, a.num_layers, vocab)
        all_adapters = write_adapters(base, Path(tmp), max(counts), a.rank, targets)
        rows = [run_once(base, {}, prompts, a.max_tokens, "base", opts)]
        for k in counts:
            subset = {f"a{i}": all_adapters[f"a{i}"] for i in range(k)}
            rows.append(run_once(base, subset, prompts, a.max_tokens, f"lora x{k}", opts))
            rows.append(run_once(base, subset, prompts, a.max_tokens, f"x{k} unord.", opts, ordered=False))
    print(
        f"\n{a.num_prompts} prompts x {a.max_tokens} new tokens, random Llama hidden={a.hidden_size} "
        f"layers={a.num_layers}, rank {a.rank} on {','.join(targets)}, {a.threads} thread(s)"
    )
    print("unord.: each step's requests back in arrival order (no LoRA-aware ordering)")
    print(f"{'run':<12}{'tokens':>8}{'tok/s':>10}{'cpu ms/tok':>12}{'vs base':>9}")
    base_tok_s = rows[0]["tok_s"]
    for r in rows:
        print(
            f"{r['run']:<12}{r['tokens']:>8}{r['tok_s']:>10.1f}{r['cpu_ms_tok']:>12.3f}"
            f"{r['tok_s'] / base_tok_s:>8.2f}x"
        )


if __name__ == "__main__":
    main()
