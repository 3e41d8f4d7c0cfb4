"""TensorKVStorage.before_copy: called before any block of a copy moves, and async scheduling fences its
KV copies through it (no copy runs while a forward is in flight)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from engine_testlib import make_engine, random_prompts

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import Tier
from kvsched.core.request import SamplingParams
from kvsched.engine.kv_storage import TensorKVStorage


def _storage() -> TensorKVStorage:
    cfg = CacheConfig(tokens_per_block=2, num_device_blocks=4, num_host_blocks=4)
    return TensorKVStorage(cfg, num_layers=2, num_kv_heads=3, head_dim=4)


def test_before_copy_is_called_once_per_copy_before_any_block_moves():
    s = _storage()
    s.device_pool.copy_(torch.arange(s.device_pool.numel(), dtype=s.dtype).view_as(s.device_pool))
    seen: list[torch.Tensor] = []
    s.before_copy = lambda: seen.append(s.host_blocks.clone())
    s.copy_blocks(Tier.DEVICE, [1, 3], Tier.HOST, [0, 2])
    assert len(seen) == 1 and not seen[0].any()  # the hook saw the host tier before the copy
    assert torch.equal(s.host_blocks[0], s.device_pool[:, 1]) and torch.equal(
        s.host_blocks[2], s.device_pool[:, 3]
    )
    s.copy_blocks(Tier.HOST, [2], Tier.DEVICE, [0])
    assert len(seen) == 2


def test_a_raising_hook_stops_the_copy():
    s = _storage()
    s.device_pool.fill_(1.0)

    def refuse() -> None:
        raise RuntimeError("not now")

    s.before_copy = refuse
    with pytest.raises(RuntimeError, match="not now"):
        s.copy_blocks(Tier.DEVICE, [0], Tier.HOST, [0])
    assert not s.host_blocks.any()
    s.before_copy = None
    s.copy_blocks(Tier.DEVICE, [0], Tier.HOST, [0])
    assert s.host_blocks[0].eq(1.0).all()


def test_async_scheduling_copies_wait_for_the_forward_in_flight(tiny_llama_dir):
    # 8 requests of up to 6 blocks in 14 device blocks: suspended to the host and resumed.
    ex = make_engine(
        tiny_llama_dir,
        async_scheduling=True,
        tokens_per_block=8,
        num_device_blocks=14,
        num_host_blocks=64,
        enable_block_reuse=False,
    )
    storage = ex.parts.storage
    assert ex._overlap is not None and storage.before_copy == ex._overlap.fence
    assert "copy_blocks" not in vars(storage)  # the hook, not a patched method
    running = threading.Event()
    model = ex.parts.runner.model

    def forward(batch, kv_storage):  # noqa: ANN001, ANN202
        running.set()
        try:
            # Held open long enough that a copy made while it runs, unfenced, is seen every time
            # (the tiny model's own forward is about a millisecond).
            time.sleep(0.01)
            return model(batch, kv_storage)
        finally:
            running.clear()

    ex.parts.runner.model = forward
    fence = storage.before_copy
    overlapped = []

    def fenced() -> None:
        fence()
        overlapped.append(running.is_set())

    storage.before_copy = fenced
    params = SamplingParams(max_tokens=12, temperature=0.0)
    for p in random_prompts([10, 14, 20, 12, 18, 9, 30, 5], seed=3):
        ex.add_request(p, params)
    ex.run()
    assert overlapped and not any(overlapped)  # copies happened, none beside a forward
    assert ex.get_stats().num_paused > 0
