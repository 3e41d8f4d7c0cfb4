"""The GEMM profile of `LinearCostModel`: measured dense-layer seconds per row count as one more feature.

A CPU BLAS can make M = 3 rows cost more than M = 4; with the profile the fit follows that shape, and a
line without it cannot (the cause of the simulator's under-prediction at small decode batches).
"""

from __future__ import annotations

import pytest

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.sim.calibration import GemmProfile, nnls_relative
from kvsched.sim.cost import FEATURE_NAMES, GEMM_FEATURE, LinearCostModel, StepShape
from kvsched.sim.simulator import Simulator
from kvsched.sim.synthetic import LengthDist, synthetic_workload

# Non-monotone at M = 3 -> 4, as MKL's sgemm on the CPU engine; linear past 16 rows.
ROWS = (1, 2, 3, 4, 8, 16, 64)
BODY = (0.040, 0.060, 0.070, 0.050, 0.060, 0.080, 0.200)
HEAD = (0.010, 0.020, 0.030, 0.015, 0.018, 0.025, 0.060)
PROFILE = GemmProfile(ROWS, BODY, HEAD)


def _decodes(batch: int, kv_len: int = 100) -> StepShape:
    s = StepShape()
    for _ in range(batch):
        s.add_decode(kv_len)
    return s


def test_profile_is_exact_at_measured_rows_interpolated_between_and_extrapolated_past():
    for m, b, h in zip(ROWS, BODY, HEAD):
        assert PROFILE.seconds(m, m) == pytest.approx(b + h)
        assert PROFILE.seconds(m, 0) == pytest.approx(b)  # a step whose chunks all end later: no LM head
    assert PROFILE.seconds(0, 0) == 0.0
    assert PROFILE.seconds(6, 0) == pytest.approx((0.050 + 0.060) / 2)
    assert PROFILE.seconds(3, 3) > PROFILE.seconds(4, 4)  # the shape a line cannot follow
    slope = (0.200 - 0.080) / (64 - 16)
    assert PROFILE.seconds(100, 0) == pytest.approx(0.200 + 36 * slope)
    one = GemmProfile((8,), (0.08,), (0.02,))  # one measured row count: proportional beyond it
    assert one.seconds(16, 16) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "rows, body, head",
    [
        ((), (), ()),
        ((1, 2), (0.1,), (0.1, 0.1)),  # a body time missing
        ((1, 2), (0.1, 0.1), (0.1,)),  # a head time missing
        ((2, 1), (0.1, 0.1), (0.1, 0.1)),  # not increasing
        ((0, 1), (0.1, 0.1), (0.1, 0.1)),  # 0 rows measured
        ((1, 2), (0.1, -0.1), (0.1, 0.1)),  # negative time
        ((1, 2), (0.1, float("nan")), (0.1, 0.1)),
    ],
)
def test_bad_profiles_are_config_errors(rows, body, head):
    with pytest.raises(ConfigError, match="GemmProfile"):
        GemmProfile(rows, body, head)


def test_model_with_a_profile_has_one_more_feature_and_adds_its_seconds():
    coef = (1e-3, 1e-4, 0.0, 1e-6, 0.0, 0.0)
    with pytest.raises(ConfigError, match="7 coefficients"):
        LinearCostModel(coef, gemm=PROFILE)
    m = LinearCostModel((*coef, 2.0), gemm=PROFILE)
    assert m.feature_names == (*FEATURE_NAMES, GEMM_FEATURE)
    assert LinearCostModel(coef).feature_names == FEATURE_NAMES
    s = _decodes(3)
    assert m.features(s) == [*s.features(), PROFILE.seconds(3, 3)]
    base = LinearCostModel(coef).step_time(s)
    assert m.step_time(s) == pytest.approx(base + 2.0 * PROFILE.seconds(3, 3))
    assert m.step_time(StepShape()) == 0.0  # nothing run, nothing charged


def test_fit_with_the_profile_follows_small_batches_and_a_line_cannot():
    true = (5e-3, 0.0, 0.0, 2e-5, 1e-3, 0.0, 1.0)  # constant, KV reads, per sequence, the GEMMs
    shapes = [_decodes(b, kv) for b in (1, 2, 3, 4, 6, 8, 12, 16) for kv in (50, 200)]
    for chunk, last in ((64, True), (100, False), (128, False), (48, True)):
        s = StepShape()
        s.add_context(0, chunk, last=last)
        s.add_decode(80)
        shapes.append(s)
    truth = LinearCostModel(true, gemm=PROFILE)
    times = [truth.step_time(s) for s in shapes]
    fit = LinearCostModel.fit(shapes, times, gemm=PROFILE)
    assert fit.gemm is PROFILE
    for got, want in zip(fit.coefficients, true):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    line = LinearCostModel.fit(shapes, times)
    three, four = _decodes(3), _decodes(4)
    assert fit.step_time(three) == pytest.approx(truth.step_time(three))
    assert line.step_time(three) < 0.95 * truth.step_time(three)  # the line under-predicts batch 3 ...
    assert line.step_time(three) < line.step_time(four)  # ... because it must grow with the batch
    with pytest.raises(ConfigError, match=">= 7"):
        LinearCostModel.fit(shapes[:6], times[:6], gemm=PROFILE)


def test_nnls_drops_negative_coefficients():
    import numpy as np

    x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    y = np.array([3.0, 2.0, 1.0])  # falling: the slope would be negative, so only the constant stays
    coef = nnls_relative(x, y)
    assert coef[1] == 0.0 and coef[0] > 0


def test_simulated_small_batches_pay_the_profile():
    """Three requests decode together (a pool that holds ~3): an expensive M = 3 slows the whole run."""
    specs = synthetic_workload(3, float("inf"), LengthDist("fixed", 40), LengthDist("fixed", 30), seed=1)
    cache = CacheConfig(tokens_per_block=16, num_device_blocks=64, num_host_blocks=0)
    sched = dict(max_batch_size=8, max_num_tokens=256, chunk_unit_size=32)
    coef = (1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    cheap3 = GemmProfile(ROWS, (0.040, 0.060, 0.045, 0.050, 0.060, 0.080, 0.200), HEAD)
    runs = [
        Simulator(specs, LinearCostModel(coef, gemm=p), cache, **sched).run().summary
        for p in (PROFILE, cheap3)
    ]
    assert runs[0]["steps"] == runs[1]["steps"]
    # every decode step runs all three (29 after the prefill step), each 25 ms dearer with PROFILE
    assert runs[0]["duration_s"] - runs[1]["duration_s"] == pytest.approx(29 * 0.025, rel=1e-6)
