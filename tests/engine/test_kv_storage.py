"""The tensor backend: layout, batched copies, and byte-exact suspend/resume through the manager."""

import pytest
import torch

from kvc_helpers import req, run_context  # run_context checks the manager's invariants after prefill
from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager, Tier
from kvsched.engine.kv_storage import TensorKVStorage


def storage(device_blocks=4, host_blocks=4, tpb=2, layers=2, device="cpu", dtype=torch.float32):
    cfg = CacheConfig(tokens_per_block=tpb, num_device_blocks=device_blocks, num_host_blocks=host_blocks)
    return cfg, TensorKVStorage(
        cfg, num_layers=layers, num_kv_heads=3, head_dim=4, dtype=dtype, device=device
    )


def test_layout_and_bytes_per_block():
    _, s = storage(dtype=torch.float16)
    assert len(s.device_kv) == len(s.host_kv) == 2
    assert s.device_kv[0].shape == (4, 2, 2, 3, 4) and s.host_kv[1].shape == (4, 2, 2, 3, 4)
    assert s.bytes_per_block == 2 * 2 * 2 * 3 * 4 * 2  # layers * K/V * tokens * heads * dim * fp16
    assert s.device_kv[0].dtype == torch.float16


def test_bad_arguments():
    cfg = CacheConfig(tokens_per_block=2, num_device_blocks=4)
    for kw in ({"num_layers": 0}, {"num_kv_heads": -1}, {"head_dim": 1.5}):
        args = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, **kw}
        with pytest.raises(ConfigError):
            TensorKVStorage(cfg, **args)
    with pytest.raises(ConfigError):
        TensorKVStorage(cfg, 1, 1, 1, dtype="float32")
    _, s = storage()
    with pytest.raises(ValueError):
        s.copy_blocks(Tier.DEVICE, [0, 1], Tier.HOST, [0])
    small_cfg, small = storage(device_blocks=2)
    with pytest.raises(ConfigError):
        KVCacheManager(CacheConfig(tokens_per_block=2, num_device_blocks=4), small)


def _roundtrip(device: str) -> None:
    _, s = storage(device=device)
    for layer in range(2):
        s.device_kv[layer].copy_(torch.randn_like(s.device_kv[layer]))
    before = [t.clone() for t in s.device_kv]
    s.copy_blocks(Tier.DEVICE, [3, 1], Tier.HOST, [0, 2])
    for layer in range(2):
        assert torch.equal(s.host_kv[layer][0], before[layer][3].cpu())
        assert torch.equal(s.host_kv[layer][2], before[layer][1].cpu())
        s.device_kv[layer].zero_()
    s.copy_blocks(Tier.HOST, [2, 0], Tier.DEVICE, [0, 2])
    s.copy_blocks(Tier.HOST, [], Tier.DEVICE, [])
    for layer in range(2):
        assert torch.equal(s.device_kv[layer][0], before[layer][1])
        assert torch.equal(s.device_kv[layer][2], before[layer][3])
        assert not s.device_kv[layer][1].any()


def test_copy_roundtrip_cpu():
    _roundtrip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_roundtrip_cuda_pinned():
    _, s = storage(device="cuda")
    assert s.host_kv[0].is_pinned() and s.device_kv[0].is_cuda
    _roundtrip("cuda")


def test_suspend_resume_restores_data_byte_for_byte():
    cfg = CacheConfig(tokens_per_block=4, num_device_blocks=4, num_host_blocks=4)
    s = TensorKVStorage(cfg, num_layers=2, num_kv_heads=1, head_dim=8)
    m = KVCacheManager(cfg, s)
    r = req(1, 10, max_new=2)
    run_context(m, r)
    table = m.block_table(r)
    data = [kv[table].clone() for kv in s.device_kv]
    m.suspend_request(r)
    for kv in s.device_kv:
        kv.fill_(float("nan"))
    hog = req(2, 4, max_new=1)  # take block 0 so the resumed table differs
    run_context(m, hog)
    assert m.try_allocate_generation(r)
    new_table = m.block_table(r)[:3]
    assert new_table != table
    for layer, kv in enumerate(s.device_kv):
        assert torch.equal(kv[new_table].view(torch.int32), data[layer].view(torch.int32))
    assert m.stats().copied_bytes == 6 * s.bytes_per_block


def test_manager_counts_bytes_from_storage():
    cfg, s = storage()
    m = KVCacheManager(cfg, s)
    r = req(1, 3, max_new=1)
    assert m.prepare_context(r) and m.resize_context(r, 3)
    m.advance(r, 3)
    r.context_current_position = 3
    m.suspend_request(r)
    assert m.stats().offload_bytes == 2 * s.bytes_per_block
    assert KVCacheManager(CacheConfig(tokens_per_block=4, num_device_blocks=8)).stats().offload_bytes == 0


def test_consecutive_ids_copy_only_their_blocks():
    _, s = storage(device_blocks=8, host_blocks=8)
    for layer in range(2):
        s.device_kv[layer].copy_(torch.randn_like(s.device_kv[layer]))
    s.copy_blocks(Tier.DEVICE, [2, 3, 4, 5, 6], Tier.HOST, [1, 2, 3, 4, 5])
    for layer in range(2):
        assert torch.equal(s.host_kv[layer][1:6], s.device_kv[layer][2:7])
        assert not s.host_kv[layer][0].any() and not s.host_kv[layer][6:].any()
