"""Weight loaders: GGUF, HF safetensors folders, dummy random weights."""

from typing import Any

from kvsched.engine.weights.errors import (
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightShapeError,
)

__all__ = ["ModelLoadError", "ModelNotFoundError", "UnsupportedModelError", "WeightShapeError", "load_model"]


def __getattr__(name: str) -> Any:
    """``load_model`` is resolved lazily: importing the errors must not import torch."""
    if name == "load_model":
        from kvsched.engine.weights.loader import load_model

        return load_model
    raise AttributeError(name)
