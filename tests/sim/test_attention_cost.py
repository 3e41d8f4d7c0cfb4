"""Attention in the roofline: prefill and decode attention are separate kernels, each bounded by its own
max(FLOPs, bytes); score FLOPs are capped by the softmax exponentials where the tensor cores outrun them."""

from __future__ import annotations

import pytest

from kvsched.core.errors import ConfigError
from kvsched.sim.cost import RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS, GpuSpec
from kvsched.sim.models import load_model

FP8_70B = load_model("llama-3.1-70b", quantization="fp8", kv_cache_dtype="fp8")


def attention(cm: RooflineCostModel, shape: StepShape) -> float:
    return cm.breakdown(shape)["attention"]


def test_a_long_prefill_chunk_does_not_hide_the_decodes_kv_reads():
    cm = RooflineCostModel(FP8_70B, GPU_PRESETS["h200"])
    prefill, decodes, mixed = StepShape(), StepShape(), StepShape()
    for s in (prefill, mixed):
        s.add_context(start=16384, chunk=2048, last=False)  # FLOP-bound
    for s in (decodes, mixed):
        for _ in range(20):
            s.add_decode(kv_len=30000)  # KV-read-bound
    assert attention(cm, mixed) == pytest.approx(attention(cm, prefill) + attention(cm, decodes))
    # one max() over the whole batch would have charged only the larger of the two
    assert attention(cm, mixed) > 1.4 * max(attention(cm, prefill), attention(cm, decodes))
    assert cm.step_time(mixed) == pytest.approx(sum(cm.breakdown(mixed).values()))


def test_prefill_only_and_decode_only_steps_cost_what_a_single_roofline_gives():
    cm = RooflineCostModel(FP8_70B, GPU_PRESETS["h100"], tp=2)
    s = StepShape()
    s.add_context(start=0, chunk=4096, last=True)
    flops = (
        s.attn_pairs * FP8_70B.attn_flops_per_pair / (2 * 1979e12 * GPU_PRESETS["h100"].attention_efficiency)
    )
    assert attention(cm, s) == pytest.approx(flops)
    s.reset()
    assert (s.ctx_tokens, s.ctx_pairs, s.ctx_kv_tokens) == (0, 0, 0)
    s.add_decode(kv_len=1023)
    kv = 1025 * cm.kv_bytes_per_token / (3.35e12 * GPU_PRESETS["h100"].attention_efficiency)
    assert attention(cm, s) == pytest.approx(kv)  # 1,024 KV tokens read, 1 written (per GPU)


def test_fp8_attention_on_b200_is_capped_by_its_exponential_units_not_on_hopper():
    b200, h100 = GPU_PRESETS["b200"], GPU_PRESETS["h100"]
    exp_cap = 148 * 16 * 1.965e9 * 4 * 128  # SMs x MUFU ops/clock x clock x FLOPs per exponential
    assert b200.attention_flops("fp8", 128) == pytest.approx(exp_cap)
    assert exp_cap < b200.gemm_flops("fp8")
    assert b200.attention_flops("bf16", 128) == b200.gemm_flops("bf16")  # BF16 MMA is the slower one
    assert h100.attention_flops("fp8", 128) == h100.gemm_flops("fp8")  # Hopper: tensor-bound
    cm = RooflineCostModel(FP8_70B, b200)
    s = StepShape()
    s.add_context(start=0, chunk=8192, last=True)
    assert attention(cm, s) == pytest.approx(
        s.attn_pairs * FP8_70B.attn_flops_per_pair / (exp_cap * b200.attention_efficiency)
    )


def test_no_exponential_ceiling_by_default_and_a_negative_one_is_refused():
    g = GpuSpec(
        "x", bf16_flops=1e15, fp8_flops=2e15, hbm_bandwidth=1e12, hbm_bytes=1e10, host_link_bandwidth=1e10
    )
    assert g.attention_flops("fp8", 64) == 2e15
    with pytest.raises(ConfigError, match="sfu_exp_rate"):
        GpuSpec(
            "x",
            bf16_flops=1e15,
            fp8_flops=2e15,
            hbm_bandwidth=1e12,
            hbm_bytes=1e10,
            host_link_bandwidth=1e10,
            sfu_exp_rate=-1.0,
        )
