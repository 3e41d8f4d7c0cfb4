"""The model over the real KV manager and TensorKVStorage: suspend to host and resume into other blocks,
and a prefix reused from the cache, still give HF's logits."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request, RequestState
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.model_runner import ModelRunner
from kvsched.engine.weights.loader import load_model

TPB = 4


def hf_last(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0, -1]


def context_step(runner, kv, req: Request, chunk: int) -> torch.Tensor | None:
    assert kv.prepare_context(req)
    chunk = min(chunk, req.context_remaining_length)
    assert kv.resize_context(req, chunk)
    req.context_chunk_size = chunk
    rows, logits = runner.run(SimpleNamespace(context_requests=[req], generation_requests=[]), kv)
    kv.advance(req, chunk)
    req.context_current_position += chunk
    return logits[0] if rows else None


def decode_step(runner, kv, req: Request, token: int) -> torch.Tensor:
    if req.state == RequestState.CONTEXT_INIT:
        req.state = RequestState.GENERATION_IN_PROGRESS
    req.output_token_ids.append(token)
    assert kv.try_allocate_generation(req)
    _, logits = runner.run(SimpleNamespace(context_requests=[], generation_requests=[req]), kv)
    kv.advance(req, 1)
    return logits[0]


def test_suspend_resume_and_prefix_reuse(tiny_llama):
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    cache_cfg = CacheConfig(
        tokens_per_block=TPB, num_device_blocks=24, num_host_blocks=24, enable_block_reuse=True
    )
    storage = TensorKVStorage(cache_cfg, config.num_layers, config.num_kv_heads, config.head_dim)
    kv = KVCacheManager(cache_cfg, storage=storage)
    runner = ModelRunner(model, storage, cache_cfg)
    g = torch.Generator().manual_seed(7)
    system = torch.randint(0, 97, (14,), generator=g).tolist()
    a = Request(1, system + [5, 6, 7], 8)
    logits = None
    while a.context_remaining_length:
        logits = context_step(runner, kv, a, 5)
    torch.testing.assert_close(logits, hf_last(hf, a.prompt_token_ids), atol=1e-4, rtol=0)
    logits = decode_step(runner, kv, a, 11)
    torch.testing.assert_close(logits, hf_last(hf, a.prompt_token_ids + [11]), atol=1e-4, rtol=0)
    before = kv.block_table(a)
    # a filler request takes the blocks a frees, so a resumes into different ones
    kv.suspend_request(a)
    filler = Request(2, torch.randint(0, 97, (12,), generator=g).tolist(), 4)
    context_step(runner, kv, filler, 12)
    logits = decode_step(runner, kv, a, 13)
    assert kv.block_table(a)[: len(before)] != before
    torch.testing.assert_close(logits, hf_last(hf, a.prompt_token_ids + [11, 13]), atol=1e-4, rtol=0)
    # b shares the system prompt: its first blocks come from the prefix cache, only the rest is computed
    b = Request(3, system + [40, 41], 8)
    assert kv.prepare_context(b)
    assert b.context_current_position == 12  # 3 full blocks of the shared prefix
    logits = context_step(runner, kv, b, 64)
    torch.testing.assert_close(logits, hf_last(hf, b.prompt_token_ids), atol=1e-4, rtol=0)
