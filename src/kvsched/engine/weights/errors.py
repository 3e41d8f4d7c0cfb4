"""Typed errors of model loading: each names the file, tensor or architecture at fault."""

from __future__ import annotations

from kvsched.core.errors import KVSchedError, UnsupportedFeatureError


class ModelLoadError(KVSchedError):
    """A checkpoint cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path, or a file it must contain, does not exist."""


class UnsupportedModelError(ModelLoadError, UnsupportedFeatureError):
    """The checkpoint's architecture (or one of its options) is not supported."""


class WeightShapeError(ModelLoadError, ValueError):
    """A tensor is missing or its shape does not match the config."""
