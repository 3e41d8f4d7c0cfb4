"""Hardware and model presets, user-supplied files, and clear errors on bad ones."""

from __future__ import annotations

import json

import pytest

from kvsched.core.errors import ConfigError
from kvsched.sim.hardware import GPU_PRESETS, load_gpu
from kvsched.sim.models import MODEL_PRESETS, load_model


def test_required_presets_exist():
    assert {"a100", "h100", "h200", "b200", "l40s"} <= set(GPU_PRESETS)
    assert {"llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "mistral-7b", "smollm2-135m"} <= set(MODEL_PRESETS)
    h200 = load_gpu("H200")
    assert h200.hbm_bandwidth == 4.8e12 and h200.hbm_bytes == 141e9 and h200.source


def test_user_gpu_file(tmp_path):
    p = tmp_path / "gpu.json"
    p.write_text(
        json.dumps({"name": "mine", "bf16_tflops": 100, "hbm_tbps": 1.0, "hbm_gb": 24, "host_link_gbps": 32})
    )
    g = load_gpu(str(p))
    assert (g.name, g.bf16_flops, g.fp8_flops, g.hbm_bytes) == ("mine", 100e12, 100e12, 24e9)
    p.write_text(
        json.dumps(
            {
                "name": "bad",
                "bf16_tflops": 100,
                "hbm_tbps": 1.0,
                "hbm_gb": 24,
                "host_link_gbps": 32,
                "mfu": 1.5,
            }
        )
    )
    with pytest.raises(ConfigError, match="mfu"):
        load_gpu(str(p))
    p.write_text(json.dumps({"name": "x", "bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        load_gpu(str(p))
    with pytest.raises(ConfigError, match="unknown gpu"):
        load_gpu("tpu-v9")


def test_user_hf_config(tmp_path):
    cfg = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": 28,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "torch_dtype": "bfloat16",
    }
    d = tmp_path / "qwen"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d))
    assert m.num_params == MODEL_PRESETS["qwen2.5-7b"].num_params  # qkv bias inferred from qwen2
    assert m.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(str(d))
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("gpt-9")


def test_kv_heads_split_over_tp_and_fp8_override():
    m = MODEL_PRESETS["llama-3.1-70b"]
    assert m.kv_bytes_per_token_per_gpu(4) == m.kv_bytes_per_token / 4
    assert m.kv_bytes_per_token_per_gpu(16) == m.kv_bytes_per_token / 8  # 8 KV heads replicated
    fp8 = load_model("llama-3.1-8b", weight_bytes=1.0, kv_bytes=1.0, fp8_compute=True)
    assert fp8.kv_bytes_per_token == 65_536 and fp8.fp8_compute
