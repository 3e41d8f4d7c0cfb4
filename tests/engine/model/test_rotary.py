"""Our rotary embedding against transformers' own Llama RoPE (a reference no one here wrote): the same
rotated q and k bit for bit, at scattered positions, with the signed sin table and fused heads."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvsched.engine.model.layers import RotaryEmbedding, apply_rotary_signed


def test_rotary_is_bit_identical_to_transformers():
    head_dim, heads, kv_heads, theta = 64, 6, 2, 100000.0
    cfg = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      rope_theta=theta, max_position_embeddings=8192)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 513, 4095, 3, 2048], dtype=torch.int64)  # not contiguous
    t = positions.numel()
    q = torch.randn(t, heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    # HF layout: [B, H, T, D] with cos/sin [B, T, D]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    cos, sin = RotaryEmbedding(head_dim, theta)(positions, torch.float32)
    assert torch.equal(cos[:, 0], hf_cos[0])
    assert torch.equal(sin[:, 0, head_dim // 2 :], hf_sin[0, :, head_dim // 2 :])
    assert torch.equal(sin[:, 0, : head_dim // 2], -hf_sin[0, :, : head_dim // 2])  # the signed half
    assert torch.equal(apply_rotary_signed(q, cos, sin), hq[0].transpose(0, 1))
    # q and k heads side by side in one strided view, as the fused projection rotates them
    qk = torch.cat((q, k), dim=1)
    both = apply_rotary_signed(qk, cos, sin)
    assert torch.equal(both[:, :heads], hq[0].transpose(0, 1))
    assert torch.equal(both[:, heads:], hk[0].transpose(0, 1))
