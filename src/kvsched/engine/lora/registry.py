"""The adapters an engine serves, by name and by id, and the page sizes the scheduler budgets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvsched.core.errors import ConfigError, InvalidRequestError, RequestTooLargeError
from kvsched.core.peft import PeftCache
from kvsched.engine.lora.adapter import LoraAdapter, load_adapter
from kvsched.engine.model_config import ModelConfig

#: One PEFT cache page, in bytes of adapter weights (an adapter takes ceil(bytes / page) pages).
DEFAULT_LORA_PAGE_BYTES = 1 << 16


@dataclass(slots=True)
class LoraRegistry:
    """Loaded adapters: ``ids[name]`` (1, 2, ... in the order given) and ``adapters[id]``.

    Adapters loaded at runtime (``add``) get fresh ids: an id is never reused after ``remove``, so a
    prefix-cache block keyed by an unloaded adapter's id can never match a later adapter.
    """

    adapters: dict[int, LoraAdapter] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    page_bytes: int = DEFAULT_LORA_PAGE_BYTES
    dtype: torch.dtype = torch.float32
    next_id: int = 1
    #: True when the page budget was not given (``max_device_pages=None``): it grows and shrinks with
    #: the adapters loaded and unloaded at runtime, so every loaded adapter fits at once.
    budget_follows: bool = False

    @classmethod
    def load(
        cls,
        modules: Mapping[str, str | Path],
        base: ModelConfig,
        *,
        dtype: torch.dtype,
        page_bytes: int = DEFAULT_LORA_PAGE_BYTES,
    ) -> LoraRegistry:
        """Load every adapter into host memory (``AdapterResidency`` copies them to the device)."""
        reg = cls(page_bytes=page_bytes, dtype=dtype)
        for name, path in modules.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"lora_modules: adapter name {name!r} must be a non-empty string")
            reg.add(load_adapter(name, path, base, dtype=dtype, device="cpu"))
        return reg

    def add(self, adapter: LoraAdapter) -> int:
        """Register a loaded adapter under a fresh id (its name must be new)."""
        if adapter.name in self.ids:
            raise InvalidRequestError(f"LoRA adapter {adapter.name!r} is already loaded")
        lora_id, self.next_id = self.next_id, self.next_id + 1
        self.adapters[lora_id] = adapter
        self.ids[adapter.name] = lora_id
        return lora_id

    def remove(self, name: str) -> int:
        """Forget the adapter called ``name``; returns its id."""
        lora_id = self.ids.pop(name)
        del self.adapters[lora_id]
        return lora_id

    def pages(self, lora_id: int) -> int:
        return self.pages_of(self.adapters[lora_id])

    def pages_of(self, adapter: LoraAdapter) -> int:
        return max(1, -(-adapter.num_bytes // self.page_bytes))

    def peft_cache(self, max_device_pages: int | None) -> PeftCache:
        """The scheduler's page budget; ``None`` = room for every loaded adapter at once."""
        pages = {i: self.pages(i) for i in self.adapters}
        self.budget_follows = max_device_pages is None
        budget = sum(pages.values()) if max_device_pages is None else max_device_pages
        return PeftCache(budget, pages)

    def resolve(self, lora: int | str | None) -> int | None:
        """A request's adapter (id or name) -> its id; an unknown one is an InvalidRequestError."""
        if lora is None:
            return None
        if isinstance(lora, str):
            if lora not in self.ids:
                raise InvalidRequestError(f"unknown LoRA adapter {lora!r} (loaded: {sorted(self.ids)})")
            return self.ids[lora]
        if isinstance(lora, bool) or not isinstance(lora, int) or lora not in self.adapters:
            loaded = ", ".join(f"{i}={a.name}" for i, a in self.adapters.items()) or "none"
            raise InvalidRequestError(f"lora_id={lora!r} is not a loaded LoRA adapter (loaded: {loaded})")
        return lora

    def check_fits(self, lora_id: int, max_device_pages: int) -> None:
        pages = self.pages(lora_id)
        if pages > max_device_pages:
            raise RequestTooLargeError(
                f"LoRA adapter {self.adapters[lora_id].name!r} needs {pages} pages, the device budget is "
                f"{max_device_pages}"
            )
