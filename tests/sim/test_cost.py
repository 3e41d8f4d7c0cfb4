"""The roofline against hand-computed cases, and the linear fit recovering known coefficients."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.core.errors import ConfigError
from kvsched.sim.cost import LinearCostModel, RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import MODEL_PRESETS

LLAMA8 = MODEL_PRESETS["llama-3.1-8b"]
IDEAL_H200 = GPU_PRESETS["h200"].with_efficiency(
    mfu=1.0, hbm_efficiency=1.0, attention_efficiency=1.0, host_link_efficiency=1.0
)


def test_llama8b_counts_match_hand_computation():
    layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert LLAMA8.layer_params == layer == 218_112_000
    assert LLAMA8.num_params == 32 * layer + 2 * 128256 * 4096 + 4096  # ~8.03e9
    assert LLAMA8.kv_bytes_per_token == 131_072  # 2 x 32 layers x 8 heads x 128 x 2 B
    assert MODEL_PRESETS["llama-3.1-70b"].kv_bytes_per_token == 327_680
    # tied head: SmolLM2 has one embedding matrix
    smol = MODEL_PRESETS["smollm2-135m"]
    assert abs(smol.num_params - 134_515_008) == 0


def test_single_decode_is_weight_bound_on_h200():
    cm = RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=0.0)
    s = StepShape()
    s.add_decode(kv_len=1023)
    b = cm.breakdown(s)
    weight_bytes = (32 * 218_112_000 + 128256 * 4096 + 4096) * 2  # layers + LM head, not the lookup table
    assert b["linear"] == pytest.approx(weight_bytes / 4.8e12)  # ~3.13 ms (doc: 3.35 ms for ~16 GB)
    assert b["attention"] == pytest.approx((1024 + 1) * 131072 / 4.8e12)
    assert cm.step_time(s) == pytest.approx(b["linear"] + b["attention"])


def test_long_prefill_is_compute_bound():
    cm = RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=1e-3)
    s = StepShape()
    s.add_context(start=0, chunk=4096, last=True)
    assert (s.num_tokens, s.num_seqs, s.num_logits, s.attn_pairs) == (4096, 1, 1, 4096 * 4097 // 2)
    lin_flops = 4096 * 2 * 32 * (218_112_000 - 2 * 4096) + 2 * 128256 * 4096
    attn_flops = (4096 * 4097 // 2) * 4 * 32 * 32 * 128
    expected = lin_flops / 989e12 + attn_flops / 989e12 + 1e-3
    assert cm.step_time(s) == pytest.approx(expected)
    assert 0.06 < expected < 0.08  # the doc's worked example: ~6.6e13 FLOPs at full peak


def test_chunk_after_prefix_attends_to_history():
    s = StepShape()
    s.add_context(start=100, chunk=10, last=False)
    assert s.attn_pairs == 10 * 100 + 55 and s.kv_read_tokens == 110 and s.num_logits == 0


def test_copies_overlap_or_add():
    s = StepShape()
    s.add_decode(kv_len=10)
    s.d2h_bytes = 4096 * 131072  # suspend a 4k-token request: 512 MiB
    over = RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=0.0, overlap_copies=True)
    serial = RooflineCostModel(LLAMA8, IDEAL_H200, step_overhead=0.0, overlap_copies=False)
    copy = 4096 * 131072 / 64e9  # ~8.4 ms at the theoretical Gen5 x16 figure
    compute = sum(v for k, v in over.breakdown(s).items() if k != "copy")
    assert over.step_time(s) == pytest.approx(max(compute, copy))
    assert serial.step_time(s) == pytest.approx(compute + copy)
    # a pure copy step (nothing scheduled) has no compute overhead
    idle = StepShape(h2d_bytes=64e9)
    assert over.step_time(idle) == pytest.approx(1.0)


def test_tensor_parallel_splits_work_and_pays_allreduce():
    s = StepShape()
    s.add_decode(kv_len=0)
    one = RooflineCostModel(LLAMA8, IDEAL_H200, tp=1, step_overhead=0.0).breakdown(s)
    two = RooflineCostModel(LLAMA8, IDEAL_H200, tp=2, step_overhead=0.0).breakdown(s)
    assert two["linear"] == pytest.approx(one["linear"] / 2)
    ring = 2 * (1 / 2) * 4096 * 2 / (450e9 * IDEAL_H200.gpu_link_efficiency)
    assert two["allreduce"] == pytest.approx(2 * 32 * (ring + 8e-6))
    with pytest.raises(ConfigError):
        RooflineCostModel(LLAMA8, IDEAL_H200, tp=3)


def test_linear_fit_recovers_coefficients():
    true = (2e-3, 1e-5, 1e-9, 2e-8, 1e-4, 3e-6)
    shapes, times = [], []
    for i in range(40):
        s = StepShape()
        for j in range(i % 7 + 1):
            s.add_decode(kv_len=50 * j + 3 * i)
        if i % 3 == 0:
            s.add_context(start=i, chunk=10 + 20 * i, last=i % 2 == 0)
        shapes.append(s)
        times.append(sum(c * f for c, f in zip(true, s.features())))
    fit = LinearCostModel.fit(shapes, times)
    for got, want in zip(fit.coefficients, true):
        assert got == pytest.approx(want, rel=1e-3)
    assert fit.step_time(shapes[5]) == pytest.approx(times[5])
    with pytest.raises(ConfigError):
        LinearCostModel.fit(shapes[:3], times[:3])


def test_step_time_equals_breakdown_sum_for_mixed_batches():
    for tp, overlap in ((1, True), (2, False), (4, True)):
        cm = RooflineCostModel(
            MODEL_PRESETS["llama-3.1-70b"], GPU_PRESETS["h100"], tp=tp, overlap_copies=overlap
        )
        s = StepShape(h2d_bytes=3e8, d2h_bytes=1e8)
        s.add_context(start=512, chunk=256, last=False)
        for k in range(20):
            s.add_decode(kv_len=100 * k)
        b = cm.breakdown(s)
        compute = b["linear"] + b["attention"] + b["allreduce"] + b["overhead"]
        want = max(compute, b["copy"]) if overlap else compute + b["copy"]
        assert cm.step_time(s) == pytest.approx(want)
        assert b["copy"] == pytest.approx(cm.copy_time(3e8))


@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(1, 64), st.booleans()), max_size=6),
    st.lists(st.tuples(st.integers(0, 500), st.integers(1, 4)), max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_shape_sums_match_brute_force(contexts, decodes):
    s = StepShape()
    pairs = kv = tokens = logits = 0
    for start, chunk, last in contexts:
        s.add_context(start, chunk, last)
        pairs += sum(start + i + 1 for i in range(chunk))  # query i attends to keys 0..start+i
        kv += start + chunk
        tokens += chunk
        logits += last
    for kv_len, n in decodes:
        s.add_decode(kv_len, n)
        pairs += sum(kv_len + i + 1 for i in range(n))
        kv += kv_len + n
        tokens += n
        logits += n
    assert (s.attn_pairs, s.kv_read_tokens, s.num_tokens, s.num_logits) == (pairs, kv, tokens, logits)
    assert s.num_seqs == len(contexts) + len(decodes)
