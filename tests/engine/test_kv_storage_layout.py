"""The block-major host layout: scattered-id copies, byte-exact suspend/resume and host-tier prefix
hits on fragmented pools, and the errors of bad ids."""

import random

import pytest
import torch

from kvc_helpers import run_context  # checks the manager's invariants after each prefill
from kvsched.core.config import CacheConfig
from kvsched.core.kvcache import KVCacheManager, Tier
from kvsched.core.kvcache.invariants import check_invariants
from kvsched.core.kvcache.keys import chain_keys, pack_tokens, root_key
from kvsched.core.request import Request
from kvsched.engine.kv_storage import TensorKVStorage

LAYERS, HEADS, DIM = 3, 2, 4


def make(device_blocks: int, host_blocks: int, tpb: int = 4, dtype=torch.float32, reuse=False):
    cfg = CacheConfig(
        tokens_per_block=tpb,
        num_device_blocks=device_blocks,
        num_host_blocks=host_blocks,
        enable_block_reuse=reuse,
    )
    return cfg, TensorKVStorage(cfg, LAYERS, HEADS, DIM, dtype=dtype)


def fill_random(s: TensorKVStorage, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s.device_pool.copy_(torch.randn(s.device_pool.shape, generator=g).to(s.dtype))
    s.host_blocks.copy_(torch.randn(s.host_blocks.shape, generator=g).to(s.dtype))


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Compare bit patterns, not values (NaN payloads and -0.0 must survive a copy too)."""
    return t.contiguous().view(torch.uint8)


def test_layouts_device_per_layer_contiguous_host_block_contiguous():
    _, s = make(5, 6)
    assert s.device_pool.shape == (LAYERS, 5, 2, 4, HEADS, DIM)
    assert s.host_blocks.shape == (6, LAYERS, 2, 4, HEADS, DIM)
    for layer, kv in enumerate(s.device_kv):
        assert kv.is_contiguous() and kv.data_ptr() == s.device_pool[layer].data_ptr()
        kv.view(-1, HEADS, DIM)  # paged attention views a layer flat: must not raise
    block_bytes = LAYERS * 2 * 4 * HEADS * DIM * 4
    assert s.bytes_per_block == block_bytes
    for b in range(6):
        assert s.host_blocks[b].is_contiguous()
        assert s.host_blocks[b].data_ptr() == s.host_blocks.data_ptr() + b * block_bytes
    s.host_blocks[4, 2].fill_(3.0)
    assert s.host_kv[2].shape == (6, 2, 4, HEADS, DIM)
    assert (s.host_kv[2][4] == 3.0).all() and not s.host_kv[1][4].any() and not s.host_kv[2][3].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scattered_copies_both_ways_move_exactly_their_blocks(dtype):
    rng = random.Random(7)
    _, s = make(40, 50, dtype=dtype)
    fill_random(s, 1)
    src = rng.sample(range(40), 24)
    dst = rng.sample(range(50), 24)
    dev_before, host_before = s.device_pool.clone(), s.host_blocks.clone()
    s.copy_blocks(Tier.DEVICE, src, Tier.HOST, dst)
    want_host = host_before.clone()
    for a, b in zip(src, dst):
        want_host[b] = dev_before[:, a]
    assert torch.equal(as_bits(s.host_blocks), as_bits(want_host))
    assert torch.equal(as_bits(s.device_pool), as_bits(dev_before))

    back = rng.sample(range(40), 24)
    s.copy_blocks(Tier.HOST, dst, Tier.DEVICE, back)
    want_dev = dev_before.clone()
    for a, b in zip(dst, back):
        want_dev[:, b] = want_host[a]
    assert torch.equal(as_bits(s.device_pool), as_bits(want_dev))
    for b, a in zip(back, src):
        for layer in range(LAYERS):
            assert torch.equal(as_bits(s.device_kv[layer][b]), as_bits(dev_before[layer, a]))


def test_nan_payloads_and_signed_zeros_survive():
    _, s = make(4, 4)
    bits = torch.tensor([0x7FC00001, 0x7F800001, 0x80000000, 0xFFFFFFFF], dtype=torch.int64)
    pattern = bits.to(torch.int32).view(torch.float32)  # quiet/signalling NaN payloads, -0.0, NaN
    s.device_kv[1][2].view(-1)[:4] = pattern
    s.copy_blocks(Tier.DEVICE, [2], Tier.HOST, [3])
    s.device_pool.zero_()
    s.copy_blocks(Tier.HOST, [3], Tier.DEVICE, [0])
    assert torch.equal(s.device_kv[1][0].view(-1)[:4].view(torch.int32), bits.to(torch.int32))


def test_same_tier_copies_gather_before_they_write():
    _, s = make(6, 6)
    fill_random(s, 2)
    dev, host = s.device_pool.clone(), s.host_blocks.clone()
    s.copy_blocks(Tier.DEVICE, [0, 1, 2], Tier.DEVICE, [1, 2, 3])  # overlapping ids
    assert torch.equal(s.device_pool[:, 1:4], dev[:, 0:3]) and torch.equal(s.device_pool[:, 0], dev[:, 0])
    s.copy_blocks(Tier.HOST, [5, 4], Tier.HOST, [4, 5])  # a swap
    assert torch.equal(s.host_blocks[4], host[5]) and torch.equal(s.host_blocks[5], host[4])


def test_bad_ids_are_refused_before_anything_moves():
    _, s = make(4, 3)
    fill_random(s, 3)
    host = s.host_blocks.clone()
    with pytest.raises(
        IndexError, match=r"^copy_blocks: destination block id 3 is outside the pool of 3 blocks$"
    ):
        s.copy_blocks(Tier.DEVICE, [0, 1], Tier.HOST, [0, 3])
    with pytest.raises(IndexError, match=r"source block id -1 is outside the pool of 4 blocks"):
        s.copy_blocks(Tier.DEVICE, [-1], Tier.HOST, [0])
    with pytest.raises(IndexError, match=r"source block id 3 is outside the pool of 3 blocks"):
        s.copy_blocks(Tier.HOST, [3], Tier.DEVICE, [0])
    assert torch.equal(s.host_blocks, host)


# -- through the manager, on fragmented pools -------------------------------------------------------
def write_kv(s: TensorKVStorage, table: list[int], seed: int) -> list[torch.Tensor]:
    """Random KV in the request's blocks (what its forward would write); returns it per layer."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for kv in s.device_kv:
        block = torch.randn((len(table), *kv.shape[1:]), generator=g).to(kv.dtype)
        kv[table] = block
        data.append(block)
    return data


def scattered(ids: list[int]) -> bool:
    return any(b != a + 1 for a, b in zip(ids, ids[1:]))


def test_suspend_resume_byte_exact_with_scattered_ids_on_fragmented_pools():
    rng = random.Random(11)
    cfg, s = make(64, 64, tpb=4, dtype=torch.float16)
    m = KVCacheManager(cfg, s)
    fillers = [Request(1000 + i, [i] * 3, 1) for i in range(40)]  # one block each
    for r in fillers:
        run_context(m, r)
    rng.shuffle(fillers)
    for r in fillers[:20]:  # host slots 0..19
        m.suspend_request(r)
    for r in fillers[:12] + fillers[20:35]:  # random holes in both pools
        m.free_request(r)
    keep = [Request(rid, [rid] * rng.randint(5, 17), 2) for rid in range(8)]
    data, tables = {}, {}
    for r in keep:
        run_context(m, r)
        tables[r.request_id] = table = m.block_table(r)[: m.history(r) // 4 + 1]
        data[r.request_id] = write_kv(s, table, r.request_id)
    assert sum(scattered(t) for t in tables.values()) >= 4, tables
    rng.shuffle(keep)
    host_ids = []
    for r in keep:
        m.suspend_request(r)
        host_ids += [b.slot for b in m._caches[r.request_id].blocks]
    assert scattered(host_ids), host_ids
    s.device_pool.fill_(float("nan"))  # whatever stays on the device is garbage now
    hog = Request(100, list(range(1000, 1000 + 4 * rng.randint(3, 9))), 1)
    run_context(m, hog)  # takes some of the freed ids, so the resumed tables differ
    rng.shuffle(keep)
    for r in keep:
        assert m.try_allocate_generation(r)
        table = m.block_table(r)[: len(tables[r.request_id])]
        for layer, kv in enumerate(s.device_kv):
            assert torch.equal(as_bits(kv[table]), as_bits(data[r.request_id][layer])), r
    assert any(m.block_table(r)[: len(tables[r.request_id])] != tables[r.request_id] for r in keep)
    check_invariants(m)


def test_host_tier_prefix_hit_restores_the_published_bytes():
    cfg, s = make(16, 32, tpb=4, reuse=True)
    m = KVCacheManager(cfg, s)
    small = [Request(10 + i, [i] * 3, 1) for i in range(6)]
    for r in small:
        run_context(m, r)
        m.suspend_request(r)  # host slots 0..5
    for r in small[1::2]:
        m.free_request(r)  # holes at host slots 1, 3, 5
    prompt = list(range(500, 532))  # 8 full blocks
    first = Request(1, prompt + [1], 1)
    run_context(m, first)
    data = write_kv(s, m.block_table(first)[:8], 42)
    m.free_request(first)  # published and cached on the device
    filler = Request(2, list(range(9000, 9000 + 64)), 1)  # the whole device: evicts all 8 to the host
    run_context(m, filler)
    s.device_pool.fill_(float("nan"))
    offloaded = [m._store.index[k] for k in chain_keys(root_key(None, None), pack_tokens(prompt), 16)]
    assert all(b.tier == Tier.HOST for b in offloaded)
    assert scattered([b.slot for b in offloaded]), [b.slot for b in offloaded]
    assert m.stats().offload_blocks == 6 + 8
    m.free_request(filler)
    again = Request(3, prompt + [2], 1)
    assert m.prepare_context(again)
    assert again.num_reused_tokens == 32 and m.stats().reuse_hit_blocks_host == 8
    table = m.block_table(again)[:8]
    for layer, kv in enumerate(s.device_kv):
        assert torch.equal(as_bits(kv[table]), as_bits(data[layer]))
    check_invariants(m)
