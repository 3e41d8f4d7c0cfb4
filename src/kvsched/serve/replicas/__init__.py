"""Engine replicas as Ray actors behind one OpenAI front-end (``kvsched serve --replicas N``).

``ray`` is an optional extra (``pip install 'kvsched[ray]'``); nothing here imports it at module level,
so ``--replicas`` without it fails with :func:`require_ray`'s message instead of an ImportError.
"""

from __future__ import annotations

from typing import Any

from kvsched.core.errors import ConfigError

INSTALL_HINT = "pip install 'kvsched[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"engine replicas run on Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray
