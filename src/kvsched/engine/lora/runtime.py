"""Loading and unloading LoRA adapters while the engine runs (vLLM's runtime LoRA updating).

Both run on the engine's own thread (between steps), so the registry, the PEFT cache's page sizes and
the model's wrappers never change under a forward or a scheduling pass. Unloading refuses while any
unfinished request (waiting, running or suspended) uses the adapter: the caller retries later.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from kvsched.core.errors import InvalidRequestError, RequestTooLargeError, UnsupportedFeatureError
from kvsched.core.peft import AdapterInUseError, AdapterNotFoundError
from kvsched.core.request import Request
from kvsched.engine.lora.adapter import load_adapter
from kvsched.engine.lora.layers import wrap_targets

if TYPE_CHECKING:
    from kvsched.engine.parts import EngineParts


def _lora_parts(parts: EngineParts):  # noqa: ANN202 - the three LoRA parts, checked
    registry, peft, residency = parts.lora, parts.peft_cache, parts.runner.lora
    if registry is None or peft is None or residency is None:
        raise UnsupportedFeatureError(
            "this engine was built without LoRA: start it with lora_modules or enable_lora=True"
        )
    return registry, peft, residency


def load_lora_adapter(parts: EngineParts, name: str, path: str | Path) -> int:
    """Load the HF PEFT adapter at ``path`` as ``name``; returns its id.

    Errors: AdapterNotFoundError (no such directory), InvalidRequestError (a name already loaded),
    LoraAdapterError (an adapter that does not fit the base model), RequestTooLargeError (more pages
    than the device budget, when ``max_lora_pages`` was given)."""
    registry, peft, residency = _lora_parts(parts)
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"lora_name={name!r} is invalid: must be a non-empty string")
    if name in registry.ids:
        raise InvalidRequestError(f"LoRA adapter {name!r} is already loaded")
    if not Path(path).is_dir():
        raise AdapterNotFoundError(f"LoRA adapter {name!r}: {path} is not a directory")
    adapter = load_adapter(name, path, parts.model_config, dtype=registry.dtype, device="cpu")
    pages = registry.pages_of(adapter)
    if not registry.budget_follows and pages > peft.max_device_pages:
        raise RequestTooLargeError(
            f"LoRA adapter {name!r} needs {pages} pages, the device budget is {peft.max_device_pages}"
        )
    wrap_targets(parts.model, parts.model.lora_context, residency.layers, adapter)
    lora_id = registry.add(adapter)
    peft.add_adapter(lora_id, pages)
    if registry.budget_follows:
        peft.max_device_pages += pages
    return lora_id


def unload_lora_adapter(parts: EngineParts, name: str, unfinished: Iterable[Request]) -> int:
    """Unload the adapter ``name``; returns its old id (never reused). AdapterNotFoundError for an
    unknown name, AdapterInUseError while one of ``unfinished`` uses it."""
    registry, peft, residency = _lora_parts(parts)
    lora_id = registry.ids.get(name)
    if lora_id is None:
        raise AdapterNotFoundError(f"LoRA adapter {name!r} is not loaded (loaded: {sorted(registry.ids)})")
    users = [r.request_id for r in unfinished if r.lora_id == lora_id]
    if users:
        raise AdapterInUseError(
            f"LoRA adapter {name!r} is in use by {len(users)} unfinished request(s); retry when they finish"
        )
    residency.forget(lora_id)
    pages = registry.pages(lora_id)
    peft.remove_adapter(lora_id)
    registry.remove(name)
    if registry.budget_follows:
        peft.max_device_pages -= pages
    return lora_id
