"""Helpers of the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.hf import load_hf_folder

VOCAB = 256


def random_prompts(lengths: list[int], seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    head = prefix or []
    return [head + torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


GREEDY = 0.0


def make_engine(path, **kwargs) -> Engine:
    args = EngineArgs(model=str(path), **kwargs)
    model, config = load_hf_folder(path, dtype=torch.float32, device="cpu")
    return Engine(args, parts=build_engine_parts(args, loaded=(model, config, None)))


def submit(ex: Engine, prompts, max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=GREEDY)
    return [ex.add_request(p, params) for p in prompts]


def collect(ex: Engine) -> dict:
    return {o.request_id: o.outputs[0].token_ids for o in ex.run()}


def check(ex: Engine, hf_ref, waves: list[list[list[int]]], max_tokens: int) -> None:
    """Run ``waves`` of prompts (each wave added after the previous one finished) and compare."""
    for prompts in waves:
        ids = submit(ex, prompts, max_tokens)
        got = collect(ex)
        for rid, prompt in zip(ids, prompts):
            assert got[rid] == hf_ref.greedy(prompt, max_tokens), f"prompt of {len(prompt)} tokens"
        stats = ex.kv.stats()  # every finished request gave its KV back (cached blocks may stay)
        assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
