"""Shared steps of every loader: build an empty model, fill it tensor by tensor with shape checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kvsched.engine.model.layers import RotaryEmbedding
from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.errors import WeightShapeError


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip nn.Linear/nn.Embedding random init (weights are overwritten right after).

    A ``torch.device("meta")`` context would do the same but imports torch's reference decompositions
    on first use (about 8 s on a small CPU).
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> LlamaForCausalLM:
    """Allocate the model with uninitialised weights, in ``dtype`` on ``device``."""
    with _no_init():
        model = LlamaForCausalLM(config)
    model = model.to(device=device, dtype=dtype)
    # The rotary table is derived, not loaded: keep it fp32 whatever the weights' dtype.
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
            # Adopt the loaded tensor (no copy when dtype and device already match; tied weights
            # share the Parameter object, so they stay tied).
            param.data = tensor.to(device=param.device, dtype=param.dtype).contiguous()
