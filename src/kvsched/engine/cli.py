"""`kvsched generate`: one or more prompts through the engine, text streamed to stdout as it comes.

Registering the flags imports nothing heavy; torch and the model load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from kvsched.engine.engine_args import add_engine_flags, engine_args_from_namespace


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with the engine (default model SmolLM2-135M)")
    p.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument(
        "--raw", action="store_true", help="use the prompt as is (default: apply the chat template)"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvsched.core.request import SamplingParams
    from kvsched.engine.engine import Engine

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        stop=args.stop,
    )
    engine = Engine(engine_args_from_namespace(args))
    ids = []
    for text in args.prompts:
        prompt = (
            text if args.raw else engine.parts.apply_chat_template([{"role": "user", "content": text}], True)
        )
        ids.append(engine.add_request(prompt, params))
    single = len(ids) == 1
    while engine.has_unfinished_requests():
        for out in engine.step():
            if single:
                sys.stdout.write(out.text_delta)
                sys.stdout.flush()
    if single:
        result = engine.pop_output(ids[0])
        print(
            f"\n[{len(result.outputs[0].token_ids)} tokens, finish_reason={result.outputs[0].finish_reason}]"
        )
        return 0
    for i, rid in enumerate(ids):
        result = engine.pop_output(rid)
        print(f"--- [{i}] {args.prompts[i]}\n{result.outputs[0].text}")
    return 0
