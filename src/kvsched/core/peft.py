"""LoRA page accounting: how many device pages each adapter needs, and who holds each adapter.

The scheduler reads ``max_device_pages`` and ``num_pages(req)`` to budget adapters per step, marks a
scheduled request as an owner (``acquire``) and drops the ownership when it suspends the request
(``release``), so a suspended request never pins an adapter on the device. The engine releases a
request's ownership when it finishes.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvsched.core.errors import ConfigError, InvalidRequestError, KVSchedError
from kvsched.core.request import Request


class AdapterNotFoundError(KVSchedError, LookupError):
    """A LoRA adapter name (or adapter directory) that does not exist: an HTTP 404."""


class AdapterInUseError(KVSchedError, RuntimeError):
    """An adapter some unfinished request still uses cannot be unloaded: an HTTP 409."""


class PeftCache:
    """Page sizes of LoRA adapters and their current owners (requests scheduled with them)."""

    __slots__ = ("max_device_pages", "_pages", "_default_pages", "_owners")

    def __init__(self, max_device_pages: int, pages_per_adapter: Mapping[int, int] | int) -> None:
        if not isinstance(max_device_pages, int) or max_device_pages < 0:
            raise ConfigError(f"max_device_pages={max_device_pages!r} is invalid: must be an integer >= 0")
        self.max_device_pages = max_device_pages
        if isinstance(pages_per_adapter, int):
            if pages_per_adapter <= 0:
                raise ConfigError(
                    f"pages_per_adapter={pages_per_adapter!r} is invalid: must be an integer > 0"
                )
            self._default_pages: int | None = pages_per_adapter
            self._pages: dict[int, int] = {}
        else:
            for lora_id, pages in pages_per_adapter.items():
                if not isinstance(pages, int) or pages <= 0:
                    raise ConfigError(
                        f"pages_per_adapter[{lora_id}]={pages!r} is invalid: must be an integer > 0"
                    )
            self._default_pages = None
            self._pages = dict(pages_per_adapter)
        self._owners: dict[int, set[int]] = {}

    def num_pages(self, req: Request) -> int:
        """Device pages the request's adapter needs (0 without LoRA)."""
        lora = req.lora_id
        if lora is None:
            return 0
        pages = self._pages.get(lora, self._default_pages)
        if pages is None:
            raise InvalidRequestError(f"request {req.request_id}: unknown LoRA adapter {lora}")
        return pages

    def acquire(self, req: Request) -> None:
        """Record that ``req`` runs with its adapter (the adapter must stay on the device)."""
        lora = req.lora_id
        if lora is not None:
            owners = self._owners.get(lora)
            if owners is None:
                self._owners[lora] = {req.request_id}
            else:
                owners.add(req.request_id)

    def release(self, req: Request) -> None:
        """Drop ``req``'s ownership; an adapter without owners may be evicted from the device."""
        lora = req.lora_id
        if lora is None:
            return
        owners = self._owners.get(lora)
        if owners is not None:
            owners.discard(req.request_id)
            if not owners:
                del self._owners[lora]

    def add_adapter(self, lora_id: int, pages: int) -> None:
        """Register an adapter loaded at runtime (its page size, for ``num_pages``)."""
        if not isinstance(pages, int) or pages <= 0:
            raise ConfigError(f"pages of LoRA adapter {lora_id}={pages!r} is invalid: must be an integer > 0")
        self._pages[lora_id] = pages

    def remove_adapter(self, lora_id: int) -> None:
        """Forget an unloaded adapter; it must have no owners (the engine checks before unloading)."""
        if lora_id in self._owners:
            raise AdapterInUseError(
                f"LoRA adapter {lora_id} still has owners {sorted(self._owners[lora_id])}"
            )
        self._pages.pop(lora_id, None)

    def owners(self, lora_id: int) -> frozenset[int]:
        return frozenset(self._owners.get(lora_id, ()))

    def is_pinned(self, lora_id: int) -> bool:
        """True while some scheduled (not suspended, not finished) request uses the adapter."""
        return lora_id in self._owners

    @property
    def pinned_pages(self) -> int:
        """Device pages of the adapters that have owners."""
        return sum(self._pages.get(lora, self._default_pages or 0) for lora in self._owners)
