"""Token-exact greedy equality with HF transformers on the same tiny random-weight checkpoint.

Each scenario switches on one KV-cache feature (chunked prefill, suspend/resume, prefix reuse on either
tier) and asserts from the KV manager's stats that the feature really ran.
"""

from __future__ import annotations

import pytest
from engine_testlib import check, make_engine, random_prompts

SCHEDULERS = ["unified", "recompute", "two-stage"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_mixed_length_batch(tiny_llama_dir, hf_ref, scheduler):
    ex = make_engine(tiny_llama_dir, scheduler=scheduler, tokens_per_block=8, num_device_blocks=256)
    prompts = random_prompts([1, 3, 9, 16, 17, 40, 77, 130], seed=1)
    check(ex, hf_ref, [prompts], max_tokens=20)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_chunked_prefill_small_chunk_unit(tiny_llama_dir, hf_ref, scheduler):
    ex = make_engine(
        tiny_llama_dir,
        scheduler=scheduler,
        tokens_per_block=8,
        num_device_blocks=256,
        chunk_unit_size=8,
        max_num_tokens=24,
    )
    prompts = random_prompts([5, 30, 61, 100], seed=2)
    check(ex, hf_ref, [prompts], max_tokens=12)
    assert ex.stats.num_steps > 100 // 24  # the long prompts really took several chunks


def test_suspend_and_resume_mid_generation(tiny_llama_dir, hf_ref):
    # 6 requests x up to 6 blocks each cannot all sit in 14 device blocks: some are suspended to host.
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=14, num_host_blocks=64)
    prompts = random_prompts([10, 14, 20, 12, 18, 9], seed=3)
    check(ex, hf_ref, [prompts], max_tokens=28)
    stats = ex.kv.stats()
    assert stats.num_suspends > 0 and stats.num_resumes > 0


@pytest.mark.parametrize("scheduler", ["recompute", "two-stage"])
def test_memory_pressure_baselines(tiny_llama_dir, hf_ref, scheduler):
    ex = make_engine(
        tiny_llama_dir, scheduler=scheduler, tokens_per_block=8, num_device_blocks=14, num_host_blocks=64
    )
    prompts = random_prompts([10, 14, 20, 12, 18, 9], seed=3)
    check(ex, hf_ref, [prompts], max_tokens=28)


def test_shared_prefix_reused_on_device(tiny_llama_dir, hf_ref):
    system = random_prompts([48], seed=4)[0]
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=128)
    first = random_prompts([7], seed=5, prefix=system)
    rest = random_prompts([3, 11, 20], seed=6, prefix=system)
    check(ex, hf_ref, [first, rest], max_tokens=10)
    stats = ex.kv.stats()
    assert stats.reuse_hit_tokens_device >= 3 * 48 - 3 * 8


def test_shared_prefix_reused_from_host(tiny_llama_dir, hf_ref):
    system = random_prompts([48], seed=7)[0]
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=24, num_host_blocks=128)
    first = random_prompts([5], seed=8, prefix=system)
    # Unrelated long requests fill the device pool, pushing the cached prefix blocks to the host tier.
    filler = random_prompts([120, 60], seed=9)
    again = random_prompts([9, 4], seed=10, prefix=system)
    check(ex, hf_ref, [first, filler, again], max_tokens=8)
    assert ex.kv.stats().reuse_hit_tokens_host > 0


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_everything_at_once(tiny_llama_dir, hf_ref, scheduler):
    system = random_prompts([40], seed=11)[0]
    ex = make_engine(
        tiny_llama_dir,
        scheduler=scheduler,
        tokens_per_block=8,
        num_device_blocks=20,
        num_host_blocks=128,
        chunk_unit_size=8,
        max_num_tokens=32,
    )
    first = random_prompts([6], seed=12, prefix=system)
    mixed = random_prompts([4, 15], seed=13, prefix=system) + random_prompts([2, 33, 50, 21], seed=14)
    check(ex, hf_ref, [first, mixed], max_tokens=24)
    if scheduler == "unified":
        stats = ex.kv.stats()
        assert stats.reuse_hit_tokens > 0 and stats.num_suspends > 0
