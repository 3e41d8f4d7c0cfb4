"""GGUF reading: dequantization against gguf-py, and a tiny llama GGUF (llama.cpp layout) against HF."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from model_testlib import FakeKVStorage, save_tiny

from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.weights import ModelLoadError, ModelNotFoundError
from kvsched.engine.weights.gguf_file import GGUFFile
from kvsched.engine.weights.loader import load_model

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to attn_q / attn_k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_dequantize_matches_gguf_py(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    originals = {}
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.Q5_0):
        x = rng.standard_normal((6, 64)).astype(np.float32)
        data = quants.quantize(x, qtype)
        originals[qtype.name] = (data, qtype)
        writer.add_tensor(qtype.name, data, raw_dtype=qtype)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = GGUFFile(path)
    for name, (data, qtype) in originals.items():
        got = gf.tensor(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == (6, 64)
        np.testing.assert_array_equal(got.numpy(), quants.dequantize(data, qtype))
    assert gf.tensor("f32").shape == (3, 5)


def write_tiny_gguf(path, hf_model, arch: str = "llama") -> None:
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for name, t in hf_model.state_dict().items():
        w = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:  # llama.cpp writes no output.weight for a tied head
                continue
            gname = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gname = f"blk.{layer}.{HF_TO_GGUF[module]}.{rest[-1]}"
            if arch != "llama":
                pass  # only llama tensors are permuted by llama.cpp
            elif module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("tied", "bias"), [(False, True), (True, False)])
def test_tiny_llama_gguf_matches_hf(tmp_path, tied, bias):
    hf = save_tiny(tmp_path / "hf", "llama", tie_word_embeddings=tied, attention_bias=bias)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    model, config, tok = load_model(str(path) if tied else str(tmp_path))  # a folder with one .gguf
    assert tok is None and config.tie_word_embeddings == tied and config.rope_theta == 5000.0
    toks = torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    kv = FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim)
    out = model(ForwardBatch.build([SeqInput(toks, 0, [3, 9, 1, 4, 12, 7], len(toks))], 4), kv)
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_bad_files(tmp_path):
    with pytest.raises(ModelNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(ModelLoadError):
        GGUFFile(bad)
    bad.write_bytes(b"NOPE" * 10)
    with pytest.raises(ModelLoadError, match="magic"):
        GGUFFile(bad)


def test_tiny_qwen2_gguf_with_biases_matches_hf(tmp_path):
    hf = save_tiny(tmp_path / "hf", "qwen2")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf, arch="qwen2")
    model, config, _ = load_model(str(path))
    assert config.architecture == "qwen2" and config.attention_bias
    toks = torch.randint(0, 97, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    kv = FakeKVStorage(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim)
    out = model(ForwardBatch.build([SeqInput(toks, 0, [3, 9, 1, 4], len(toks))], 4), kv)
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
