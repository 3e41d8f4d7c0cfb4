"""KV pools that cost memory only where written (engine/lazy_zeros.py), and stay byte-exact."""

from __future__ import annotations

import os

import pytest
import torch

from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.request import Request, RequestState
from kvsched.engine.kv_storage import TensorKVStorage
from kvsched.engine.lazy_zeros import lazy_zeros

MiB = 1 << 20
_SMAPS = "/proc/self/smaps"


def resident_bytes(*tensors: torch.Tensor) -> int:
    """Resident bytes of the mappings that hold ``tensors`` (counted once each; the kernel may merge
    adjacent anonymous mappings into one). Other tests' allocations and frees do not move the figure,
    as they would the process's resident size."""
    addrs = [t.data_ptr() for t in tensors]
    total, inside, found = 0, False, 0
    with open(_SMAPS) as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(lo <= a < hi for a in addrs)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
                found += 1
    assert found, "no mapping holds the tensors"
    return total


needs_smaps = pytest.mark.skipif(not os.path.exists(_SMAPS), reason="resident size read from /proc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_reads_as_zeros_and_is_writable(dtype):
    t = lazy_zeros((3, 5, 7), dtype)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
    assert not t.any()
    t[1, 2] = 1
    assert int(t.sum()) == 7 and int(t[1, 2, 0]) == 1
    assert lazy_zeros((0, 4), dtype).numel() == 0


def test_views_keep_the_mapping_alive():
    layers = lazy_zeros((4, 1024), torch.float32).unbind(0)  # the base tensor is gone, its views stay
    layers[2].fill_(3.0)
    assert float(layers[2].sum()) == 3.0 * 1024 and float(layers[1].sum()) == 0.0


@needs_smaps
def test_a_kv_pool_costs_only_the_blocks_written():
    # 32 layers x 1024 blocks x 8 KiB = 256 MiB per tier: resident only once written.
    cfg = CacheConfig(tokens_per_block=16, num_device_blocks=1024, num_host_blocks=1024)
    s = TensorKVStorage(cfg, num_layers=32, num_kv_heads=1, head_dim=64)
    assert s.bytes_per_block * 1024 == 256 * MiB
    assert resident_bytes(s.device_pool, s.host_blocks) < 8 * MiB  # 512 MiB of pools, none touched
    for kv in s.device_kv:
        kv[:128].fill_(1.0)  # an eighth of the device pool: 32 MiB
    assert 32 * MiB <= resident_bytes(s.device_pool, s.host_blocks) < 40 * MiB


def _prefill(m: KVCacheManager, s: TensorKVStorage, r: Request, gen: torch.Generator) -> None:
    assert m.prepare_context(r)
    n = r.context_remaining_length
    assert m.resize_context(r, n)
    for kv in s.device_kv:  # the forward's writes: random bytes in the request's blocks
        kv[m.block_table(r)] = torch.randn(kv[m.block_table(r)].shape, generator=gen)
    m.advance(r, n)
    r.context_current_position += n
    r.state = RequestState.GENERATION_IN_PROGRESS
    r.output_token_ids.append(7)


def test_suspend_and_resume_are_byte_exact_after_the_pools_grew():
    cfg = CacheConfig(tokens_per_block=4, num_device_blocks=64, num_host_blocks=64)
    s = TensorKVStorage(cfg, num_layers=3, num_kv_heads=2, head_dim=8)
    m = KVCacheManager(cfg, s)
    gen = torch.Generator().manual_seed(0)
    reqs = [Request(i, list(range(1000 * i, 1000 * i + 30 + 7 * i)), 4) for i in range(1, 5)]
    for r in reqs:  # blocks written one request after another: pages committed as the pool fills
        _prefill(m, s, r, gen)
    tables = {r.request_id: m.block_table(r) for r in reqs}
    data = {r.request_id: [kv[tables[r.request_id]].clone() for kv in s.device_kv] for r in reqs}
    for r in reqs[1::2]:
        m.suspend_request(r)
    for kv in s.device_kv:  # whatever the device pool holds now must not leak into the resumed KV
        kv.fill_(float("nan"))
    hog = Request(99, list(range(50, 90)), 1)
    _prefill(m, s, hog, gen)  # takes free device blocks, so resumed tables differ
    for r in reqs[1::2]:
        assert m.try_allocate_generation(r)
        table = m.block_table(r)[: len(tables[r.request_id])]
        for layer, kv in enumerate(s.device_kv):
            assert torch.equal(kv[table].view(torch.int32), data[r.request_id][layer].view(torch.int32))
    assert any(m.block_table(r)[: len(tables[r.request_id])] != tables[r.request_id] for r in reqs[1::2])
