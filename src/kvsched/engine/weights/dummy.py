"""Random weights from a config: tests and benchmarks that need a model's shape, not its knowledge."""

from __future__ import annotations

import torch

from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.common import empty_model


def dummy_model(
    config: ModelConfig, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> LlamaForCausalLM:
    """Normal(0, 0.02) matrices and biases, norms near 1, drawn from a seeded CPU generator."""
    model = empty_model(config, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            else:
                values = 0.02 * torch.randn(param.shape, generator=gen)
            param.copy_(values.to(param.dtype))
    return model
