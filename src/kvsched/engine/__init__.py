"""The PyTorch engine: :class:`Engine` (the step loop over a model) and :class:`EngineParts`.

Names resolve lazily, so importing a torch-free module of this package (the tokenizer, for one) does
not load torch. ``Executor`` is the engine's name before it was renamed: an alias of :class:`Engine`
kept for outside code; nothing in kvsched uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, tuple[str, str]] = {
    "Engine": ("kvsched.engine.engine", "Engine"),
    "Executor": ("kvsched.engine.engine", "Engine"),  # the old name (documented alias)
    "EngineParts": ("kvsched.engine.parts", "EngineParts"),
    "build_engine_parts": ("kvsched.engine.parts", "build_engine_parts"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'kvsched.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
