"""Speculative decoding on the CPU: output tokens/s, acceptance and accepted drafts per step for
k = 0, 2, 4 with each proposer (prompt lookup "ngram", and "draft": a truncated copy of the target),
on the same prompts in one run, greedy, with ratios against k = 0.

Two prompt sets: "edit" (summarise-or-edit-this-text requests whose answer repeats much of the prompt:
where prompt lookup shines) and "chat" (the built-in chat prompts, kvsched.bench.prompts). The model is
loaded once and shared by every engine (the truncated draft shares its weights too).

To say why a configuration wins or loses, it also prints the measured cost of one step's parts on
the same batch: a target forward over 1 query token per sequence (plain decode) against k + 1 (the
verification of k drafts), and one forward of the draft model. A step of speculation pays the
verification (and, for a draft model, k draft forwards) and gains 1 + accepted tokens per sequence.

    python benchmarks/speculative.py                              # SmolLM2-135M, 8 prompts x 64 tokens
    python benchmarks/speculative.py --num-prompts 4 --max-tokens 32 --sets edit
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

_EDIT_TEXTS = (
    "The library opens from nine in the morning to six in the evening on weekdays and from ten to four "
    "on Saturdays. It is closed on Sundays and public holidays. Members may borrow up to eight books and "
    "four films at a time, for three weeks, and a loan may be renewed twice.",
    "Our team met on Monday to plan the spring release. We agreed to fix the login bug first, then to "
    "write the missing tests for the payment module, and finally to update the user guide before the "
    "release on the twentieth of April.",
    "To make pancakes, mix one cup of flour, one egg, one cup of milk and a pinch of salt. Heat a little "
    "butter in a pan, pour in a ladle of batter, cook until bubbles appear, then flip and cook the other "
    "side for one more minute.",
    "The train to the coast leaves the central station every hour from seven in the morning. The journey "
    "takes two hours and ten minutes. Tickets bought online are cheaper than tickets bought on the day, "
    "and children under five travel free.",
)
_EDIT_ASKS = (
    "Rewrite the following text word for word, but in British spelling:\n\n{}",
    "Repeat the following text exactly, then add one sentence that summarises it:\n\n{}",
    "Correct any mistakes in the following text and return the full corrected text:\n\n{}",
    "Summarise the following text, quoting its key sentences:\n\n{}",
)


def edit_conversations(num: int) -> list[list[dict[str, str]]]:
    """Edit-this-text requests: the answer copies long runs of the prompt."""
    out = []
    for i in range(num):
        text = _EDIT_TEXTS[i % len(_EDIT_TEXTS)]
        ask = _EDIT_ASKS[(i // len(_EDIT_TEXTS)) % len(_EDIT_ASKS)]
        out.append([{"role": "user", "content": ask.format(text)}])
    return out


@dataclass(slots=True)
class Result:
    prompt_set: str
    proposer: str
    k: int
    seconds: float
    out_tokens: int
    steps: int
    acceptance: float | None
    accepted_per_step: float | None
    tokens: list[list[int]]

    @property
    def tok_s(self) -> float:
        return self.out_tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps


def _engine(loaded: Any, opts: dict[str, Any]) -> Any:
    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.parts import build_engine_parts

    args = EngineArgs(**opts)
    return Engine(args, parts=build_engine_parts(args, loaded=loaded))


def run_one(
    loaded: Any, prompts: list[list[int]], max_tokens: int, base: dict, proposer: str, k: int
) -> Result:
    from kvsched.core.request import SamplingParams

    opts = dict(base)
    if k:
        opts.update(speculative=proposer, num_speculative_tokens=k)
        if proposer != "draft":
            opts.pop("draft_num_layers", None)
    else:
        opts.pop("draft_num_layers", None)
    ex = _engine(loaded, opts)
    warm = SamplingParams(max_tokens=2, temperature=0.0)
    ex.add_request(prompts[0][:8], warm)
    ex.run()
    ex.stats.num_steps = 0  # count this run's steps only
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [ex.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    done = {o.request_id: o for o in ex.run()}
    seconds = time.perf_counter() - start
    outs = [done[i] for i in ids]
    tokens = [o.outputs[0].token_ids for o in outs]
    st = ex.get_stats()
    acc = per = None
    if k:
        drafts = sum(o.metrics.num_draft_tokens for o in outs)
        accepted = sum(o.metrics.num_accepted_draft_tokens for o in outs)
        steps = sum(o.metrics.num_speculative_steps for o in outs)
        acc = accepted / drafts if drafts else 0.0
        per = accepted / steps if steps else 0.0
    return Result(
        "", proposer if k else "-", k, seconds, sum(map(len, tokens)), st.num_steps, acc, per, tokens
    )


def forward_costs(
    loaded: Any, base: dict, batch: int, ctx: int, ks: list[int], reps: int
) -> dict[str, float]:
    """Median ms of one target forward with q query tokens per sequence (q = 1 and k + 1), and of one
    forward of the truncated draft with 1, on ``batch`` sequences after ``ctx`` cached tokens."""
    import torch

    from kvsched.engine.forward_batch import ForwardBatch, SeqInput

    ex = _engine(loaded, {**base, "speculative": "draft", "num_speculative_tokens": max(ks)})
    tpb = ex.parts.cache_config.tokens_per_block
    per_seq = -(-(ctx + max(ks) + 1) // tpb)
    if batch * per_seq > min(ex.kv.num_device_blocks, ex.parts.draft_kv.num_device_blocks):
        raise SystemExit("--cost-batch x context does not fit the KV pool: lower them")

    def seqs(q: int) -> list[SeqInput]:
        return [SeqInput([1] * q, ctx, list(range(b * per_seq, (b + 1) * per_seq)), q) for b in range(batch)]

    def timed(model: Any, storage: Any, q: int) -> float:
        fb = ForwardBatch.build(seqs(q), tpb, ex.parts.device)
        times = []
        with torch.inference_mode():
            model(fb, storage)  # warm-up
            for _ in range(reps):
                t = time.perf_counter()
                model(fb, storage)
                times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    out = {"target q=1": timed(ex.parts.model, ex.parts.storage, 1)}
    for k in ks:
        out[f"target q={k + 1}"] = timed(ex.parts.model, ex.parts.storage, k + 1)
    out["draft q=1"] = timed(ex.parts.draft_model, ex.parts.draft_storage, 1)
    return out


def _fmt(x: float | None, spec: str) -> str:
    """``x`` in ``spec`` (e.g. "7.1%"), or a dash as wide."""
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF or HF folder (default: SmolLM2-135M)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ks", default="2,4", help="draft lengths besides k = 0")
    p.add_argument("--proposers", default="ngram,draft")
    p.add_argument("--sets", default="edit,chat", help="prompt sets: edit, chat")
    p.add_argument("--draft-num-layers", type=int, default=None, help="truncated draft (default: 1/4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cost-reps", type=int, default=5, help="repetitions of each forward-cost timing")
    a = p.parse_args()

    import torch
    from tqdm import tqdm

    from kvsched.bench.prompts import chat_conversations
    from kvsched.engine.weights.loader import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    ks = [int(x) for x in a.ks.split(",") if x.strip()]
    proposers = [x.strip() for x in a.proposers.split(",") if x.strip()]
    sets = [x.strip() for x in a.sets.split(",") if x.strip()]
    for s in sets:
        if s not in ("edit", "chat"):
            raise SystemExit(f"--sets: unknown prompt set {s!r} (edit, chat)")
    loaded = load_model(a.model)
    tok = loaded[2]
    convs = {"edit": edit_conversations(a.num_prompts), "chat": chat_conversations(a.num_prompts)}
    prompts = {s: [tok.encode_chat(c) for c in convs[s]] for s in sets}
    base = dict(
        model=a.model,
        num_device_blocks=max(256, 4 * a.num_prompts * (a.max_tokens + 400) // 16),
        max_batch_size=max(a.num_prompts, 1),
        draft_num_layers=a.draft_num_layers,
    )
    configs = [("-", 0)] + [(prop, k) for prop in proposers for k in ks]
    results: list[Result] = []
    with tqdm(total=len(sets) * len(configs), unit="run") as bar:
        for s in sets:
            for prop, k in configs:
                bar.set_description(f"{s} {prop} k={k}")
                r = run_one(loaded, prompts[s], a.max_tokens, base, prop, k)
                r.prompt_set = s
                results.append(r)
                bar.update(1)
    ctx = int(statistics.mean(len(x) for x in prompts[sets[0]])) + a.max_tokens // 2
    costs = forward_costs(loaded, base, a.num_prompts, ctx, ks, a.cost_reps)

    print(f"\n{loaded[1].num_layers}-layer target, {a.num_prompts} prompts x {a.max_tokens} new tokens, greedy, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    head = (
        f"{'set':5s} {'proposer':8s} {'k':>2s} {'out tok/s':>10s} {'x k=0':>6s} {'ms/step':>8s} "
        f"{'accept':>7s} {'acc/step':>8s} {'same as k=0':>11s}"
    )
    print(head)
    print("-" * len(head))
    for s in sets:
        ref = next(r for r in results if r.prompt_set == s and r.k == 0)
        for r in (r for r in results if r.prompt_set == s):
            same = sum(x == y for x, y in zip(r.tokens, ref.tokens))
            print(
                f"{s:5s} {r.proposer:8s} {r.k:2d} {r.tok_s:10.1f} {r.tok_s / ref.tok_s:6.2f} "
                f"{r.ms_per_step:8.1f} {_fmt(r.acceptance, '7.1%')} "
                f"{_fmt(r.accepted_per_step, '8.2f')} {same:>5d}/{len(r.tokens):<5d}"
            )
    print(f"\nforward cost on {a.num_prompts} sequences after {ctx} cached tokens (median of {a.cost_reps}):")
    t1 = costs["target q=1"]
    for name, ms in costs.items():
        print(f"  {name:12s} {ms:7.2f} ms  ({ms / t1:4.2f} x target q=1)")
    print(
        "  a speculative step wins when (1 + accepted) x (target q=1) > (target q=k+1) "
        "[+ k x (draft q=1) with a draft model]"
    )


if __name__ == "__main__":
    main()
