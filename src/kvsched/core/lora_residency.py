"""Which LoRA adapters sit on the device: least-recently-used order under the PEFT page budget.

One policy for the engine (engine/lora/residency.py copies the weights) and the simulator
(sim/lora_residency.py charges the copy to the cost model), so both evict the same adapters: an
adapter a step uses becomes the most recently used; while the resident pages exceed the budget
(``PeftCache.max_device_pages``), the least recently used adapters that neither the step needs nor a
scheduled request pins (``PeftCache.is_pinned``) leave first. vLLM's LRU LoRA manager
(``LRUCacheWorkerLoRAManager``) keeps its GPU adapter slots the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence

__all__ = ["AdapterLRU"]

_NONE: tuple[int, ...] = ()


class AdapterLRU:
    """Resident adapters (id -> device pages), least recently used first, and their page total."""

    __slots__ = ("resident", "pages")

    def __init__(self) -> None:
        #: adapter id -> pages, in use order (a dict keeps insertion order: the first is the LRU).
        self.resident: dict[int, int] = {}
        #: Sum of ``resident``'s pages, kept as adapters come and go (no sum per step).
        self.pages = 0

    def __contains__(self, lora_id: object) -> bool:
        return lora_id in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def touch(self, lora_id: int) -> bool:
        """Make a resident adapter the most recently used; False if it is not resident."""
        resident = self.resident
        pages = resident.pop(lora_id, None)
        if pages is None:
            return False
        resident[lora_id] = pages
        return True

    def add(self, lora_id: int, pages: int) -> None:
        """A newly resident adapter, most recently used. ValueError if it is resident already."""
        if lora_id in self.resident:
            raise ValueError(f"adapter {lora_id} is already resident")
        self.resident[lora_id] = pages
        self.pages += pages

    def remove(self, lora_id: int) -> int:
        """Drop a resident adapter (unloaded); returns its pages. KeyError if it is not resident."""
        pages = self.resident.pop(lora_id)
        self.pages -= pages
        return pages

    def evict(
        self, budget: int, extra: int, keep: Container[int], is_pinned: Callable[[int], bool]
    ) -> Sequence[int]:
        """Evict least recently used first, skipping ``keep`` and pinned adapters, until the resident
        pages plus ``extra`` (an adapter about to load) fit ``budget``; returns the evicted ids in
        order. They may still not fit, if the rest is kept or pinned: the caller decides."""
        if self.pages + extra <= budget:
            return _NONE
        resident = self.resident
        evicted: list[int] = []
        for lora_id in list(resident):
            if self.pages + extra <= budget:
                break
            if lora_id in keep or is_pinned(lora_id):
                continue
            self.pages -= resident.pop(lora_id)
            evicted.append(lora_id)
        return evicted
