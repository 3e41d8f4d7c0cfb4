"""Shared steps of every loader: build an empty model, fill it tensor by tensor with shape checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kvsched.engine.model.layers import RotaryEmbedding
from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.errors import WeightShapeError


def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> LlamaForCausalLM:
    """Allocate the model without running any initializer (weights are overwritten right after)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rotary table is derived, not loaded: rebuild it in fp32 on the target device.
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    return model.eval()


def parameter_names(model: LlamaForCausalLM) -> list[str]:
    """Names to load, the tied head excluded (it shares the embedding tensor)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=True)]
    return names


def fill_parameters(
    model: LlamaForCausalLM,
    names: Iterable[str],
    fetch: Callable[[str], torch.Tensor | None],
    source: str,
) -> None:
    """Copy ``fetch(name)`` into each parameter; missing or mis-shaped tensors raise WeightShapeError."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            param = params[name]
            tensor = fetch(name)
            if tensor is None:
                raise WeightShapeError(f"{source}: tensor {name!r} is missing")
            if tuple(tensor.shape) != tuple(param.shape):
                raise WeightShapeError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the config expects {tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))
