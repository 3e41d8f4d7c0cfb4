"""Block copies split over threads give exactly the sequential loop's result."""

import random
import threading

import numpy as np
import torch

from kvsched.core.kvcache import Tier
from kvsched.engine import block_copy
from kvsched.engine.block_copy import copy_rows


def sequential(dst, src, dst_ids, src_ids):
    out = dst.copy()
    for d, s in zip(dst_ids, src_ids):
        out[d] = src[s]
    return out


def test_parallel_parts_equal_the_sequential_loop(monkeypatch):
    monkeypatch.setattr(block_copy, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    calls = []
    rows = block_copy._rows

    def spy(*a):
        calls.append((threading.get_ident(), len(a[2])))
        rows(*a)

    monkeypatch.setattr(block_copy, "_rows", spy)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=(3, 40, 5, 7), dtype=np.uint8).swapaxes(0, 1)  # strided, as the device
    dst = np.zeros((50, 3, 5, 7), dtype=np.uint8)
    dst_ids = random.Random(1).sample(range(50), 31)
    src_ids = random.Random(2).sample(range(40), 31)
    want = sequential(dst, src, dst_ids, src_ids)
    copy_rows(dst, src, dst_ids, src_ids, row_bytes=105)
    assert np.array_equal(dst, want)
    assert sorted(n for _, n in calls) == [9, 11, 11]  # three parts of 31 rows
    assert len({t for t, _ in calls}) >= 2  # the caller's part and the pool's


def test_repeated_destinations_copy_in_order(monkeypatch):
    monkeypatch.setattr(block_copy, "PARALLEL_BYTES", 1)
    src = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6)
    dst = np.zeros((3, 6), dtype=np.uint8)
    copy_rows(dst, src, [1, 2, 1, 1], [0, 1, 2, 3], row_bytes=6)  # the last write to row 1 wins
    assert np.array_equal(dst, sequential(np.zeros((3, 6), np.uint8), src, [1, 2, 1, 1], [0, 1, 2, 3]))
    assert np.array_equal(dst[1], src[3])


def test_storage_copies_through_threads_stay_byte_exact(monkeypatch):
    from kvsched.core.config import CacheConfig
    from kvsched.engine.kv_storage import TensorKVStorage

    monkeypatch.setattr(block_copy, "PARALLEL_BYTES", 1)
    cfg = CacheConfig(tokens_per_block=4, num_device_blocks=30, num_host_blocks=30)
    s = TensorKVStorage(cfg, 3, 2, 4, dtype=torch.bfloat16)
    s.device_pool.copy_(torch.randn(s.device_pool.shape).to(torch.bfloat16))
    before = s.device_pool.clone()
    src = random.Random(3).sample(range(30), 17)
    dst = random.Random(4).sample(range(30), 17)
    s.copy_blocks(Tier.DEVICE, src, Tier.HOST, dst)
    s.device_pool.zero_()
    s.copy_blocks(Tier.HOST, dst, Tier.DEVICE, src)
    for a, b in zip(src, dst):
        assert torch.equal(s.host_blocks[b].view(torch.int16), before[:, a].view(torch.int16))
        assert torch.equal(s.device_pool[:, a].view(torch.int16), before[:, a].view(torch.int16))
    others = [b for b in range(30) if b not in src]
    assert not s.device_pool[:, others].any()
