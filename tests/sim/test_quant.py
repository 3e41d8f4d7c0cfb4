"""Precision from HF configs and flags, and what it does to the step cost."""

from __future__ import annotations

import json

import pytest

from kvsched.core.errors import ConfigError
from kvsched.sim.cost import RooflineCostModel, StepShape
from kvsched.sim.hardware import GPU_PRESETS
from kvsched.sim.models import _HF, load_model, model_from_hf_config

LLAMA70 = dict(_HF["llama-3.1-70b"])
MODELOPT_FP8 = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}


def _cfg(**extra):
    return {**LLAMA70, **extra}


def test_modelopt_config_is_fp8_weights_and_fp8_kv():
    bf16 = model_from_hf_config(_cfg())
    m = model_from_hf_config(_cfg(quantization_config=MODELOPT_FP8))
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype, m.head_bytes) == (1.0, 1.0, "fp8", 2.0)
    assert m.kv_bytes_per_token == bf16.kv_bytes_per_token / 2
    # the embedding and LM head stay BF16: the checkpoint is a bit over half the BF16 one
    head = 2 * m.embedding_params
    assert m.weight_bytes_total == pytest.approx((bf16.num_params - head) * 1.0 + head * 2.0)


def test_hf_quant_config_next_to_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    (tmp_path / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8"},
            }
        )
    )
    m = load_model(str(tmp_path))
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype) == (0.5625, 1.0, "fp4")


def test_compressed_tensors_fp8_and_torch_dtypes():
    ct = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
            }
        },
        "kv_cache_scheme": {"num_bits": 8, "type": "float"},
    }
    m = model_from_hf_config(_cfg(quantization_config=ct))
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype) == (1.0, 1.0, "fp8")
    ct["config_groups"]["group_0"]["input_activations"] = None  # weight-only FP8: BF16 GEMMs
    ct["kv_cache_scheme"] = None
    m = model_from_hf_config(_cfg(quantization_config=ct))
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype) == (1.0, 2.0, "bf16")
    assert model_from_hf_config(_cfg(torch_dtype="float16")).weight_bytes == 2.0
    assert model_from_hf_config(_cfg(torch_dtype="float32")).kv_bytes == 4.0
    fp8 = model_from_hf_config(_cfg(torch_dtype="float8_e4m3fn"))
    assert (fp8.weight_bytes, fp8.head_bytes, fp8.kv_bytes, fp8.gemm_dtype) == (1.0, 1.0, 1.0, "fp8")
    assert model_from_hf_config(_cfg(quantization_config={"quant_method": "fp8"})).gemm_dtype == "fp8"


def test_flags_override_the_config():
    m = load_model("llama-3.1-70b", quantization="fp8", kv_cache_dtype="fp8")
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype) == (1.0, 1.0, "fp8")
    m = model_from_hf_config(
        _cfg(quantization_config=MODELOPT_FP8), quantization="none", kv_cache_dtype="auto"
    )
    assert (m.weight_bytes, m.kv_bytes, m.gemm_dtype) == (2.0, 1.0, "bf16")


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "modelopt", "quant_algo": "INT3"}, "INT3"),
        ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "INT2"}, "INT2"),
        ({"quant_method": "bitsandbytes"}, "bitsandbytes"),
        ({"quant_method": "gptq", "bits": 3}, "bits=3"),
    ],
)
def test_unknown_formats_are_clear_errors(qc, match):
    with pytest.raises(ConfigError, match=match):
        model_from_hf_config(_cfg(quantization_config=qc))
    with pytest.raises(ConfigError, match="torch_dtype"):
        model_from_hf_config(_cfg(torch_dtype="float7"))
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        load_model("llama-3.1-8b", kv_cache_dtype="int2")


def _prefill(n: int = 8192) -> StepShape:
    s = StepShape()
    s.add_context(0, n, True)
    return s


def _decode(batch: int = 64, kv_len: int = 2048) -> StepShape:
    s = StepShape()
    for _ in range(batch):
        s.add_decode(kv_len)
    return s


def test_fp8_step_cost_drops_at_the_fp8_peak():
    h200 = GPU_PRESETS["h200"]
    bf16 = RooflineCostModel(model_from_hf_config(_cfg()), h200, tp=2, step_overhead=0.0)
    fp8 = RooflineCostModel(
        model_from_hf_config(_cfg(quantization_config=MODELOPT_FP8)), h200, tp=2, step_overhead=0.0
    )
    # compute-bound prefill: GEMMs and attention at twice the rate
    lin_b, lin_f = bf16.breakdown(_prefill())["linear"], fp8.breakdown(_prefill())["linear"]
    assert lin_f / lin_b == pytest.approx(0.5, rel=0.02)
    assert fp8.step_time(_prefill()) < 0.55 * bf16.step_time(_prefill()) + 1e-3
    # memory-bound decode: half the weight bytes, half the KV bytes
    dec_b, dec_f = bf16.breakdown(_decode()), fp8.breakdown(_decode())
    assert dec_f["linear"] / dec_b["linear"] == pytest.approx(0.5, rel=0.03)
    assert dec_f["attention"] / dec_b["attention"] == pytest.approx(0.5, rel=0.01)
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2


def test_fp4_runs_at_the_fp4_peak_where_the_gpu_has_one():
    fp4 = model_from_hf_config(
        _cfg(quantization_config={"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8"})
    )
    fp8 = model_from_hf_config(_cfg(quantization_config=MODELOPT_FP8))
    b200, h200 = GPU_PRESETS["b200"], GPU_PRESETS["h200"]
    lin = lambda m, g: RooflineCostModel(m, g, step_overhead=0.0).breakdown(_prefill())["linear"]  # noqa: E731
    assert lin(fp4, b200) / lin(fp8, b200) == pytest.approx(0.5, rel=0.02)  # 9 vs 4.5 PFLOP/s dense
    assert lin(fp4, h200) == pytest.approx(lin(fp8, h200), rel=1e-9)  # no FP4 tensor cores: the FP8 rate
    assert b200.gemm_flops("fp4") == 2 * b200.gemm_flops("fp8") == 4 * b200.gemm_flops("bf16")


def test_sim_flags_reach_the_cost_model(tmp_path, capsys):
    from kvsched.cli import main

    d = tmp_path / "llama70-fp8"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_cfg(quantization_config=MODELOPT_FP8)))
    common = ["--gpu", "h200", "--tp", "2", "--synthetic", "--rate", "inf", "--num-requests", "4",
              "--prompt-len", "fixed:512", "--output-len", "fixed:4", "--policies", "unified", "--no-progress"]  # fmt: skip
    assert main(["sim", "--model", str(d), *common]) == 0
    fp8 = capsys.readouterr().out
    assert "1 B/weight, fp8 GEMMs, 1 B/KV element" in fp8
    assert (
        main(["sim", "--model", str(d), "--quantization", "none", "--kv-cache-dtype", "bf16", *common]) == 0
    )
    bf16 = capsys.readouterr().out
    assert "2 B/weight, bf16 GEMMs, 2 B/KV element" in bf16
    blocks = [int(t.split(": ")[1].split()[0]) for t in (fp8, bf16)]
    assert blocks[0] > 2 * blocks[1]  # half the KV bytes per block, and more HBM left after the weights
