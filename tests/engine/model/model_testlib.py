"""Helpers for the model tests: a KV stand-in with the TensorKVStorage layout and tiny HF checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


class FakeKVStorage:
    """``device_kv[layer]``: [num_blocks, 2, tpb, kv_heads, head_dim], filled with loud finite garbage
    so a read of a slot that was never written shows up in the logits."""

    def __init__(self, num_layers: int, num_blocks: int, tpb: int, kv_heads: int, head_dim: int) -> None:
        gen = torch.Generator().manual_seed(123)
        self.device_kv = [
            100.0 * torch.randn(num_blocks, 2, tpb, kv_heads, head_dim, generator=gen)
            for _ in range(num_layers)
        ]


def save_tiny(folder: Path, arch: str, **overrides) -> torch.nn.Module:
    """Save a tiny random-init HF model of ``arch`` into ``folder`` and return it (eval, fp32)."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases so a missed weight shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model
