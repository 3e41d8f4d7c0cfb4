"""Which adapters sit on the model's device: the device tier of the PEFT cache.

Every adapter is kept on the host (as loaded); a step's adapters are copied to the device before its
forward (``prepare``), and an adapter no scheduled request pins (``PeftCache.is_pinned``) is evicted
least-recently-used when a new one needs its pages. The scheduler already keeps the pages of the pinned
adapters within ``max_device_pages``, so the resident pages never exceed it either.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvsched.core.errors import KVSchedError
from kvsched.core.lora_residency import AdapterLRU
from kvsched.core.peft import PeftCache
from kvsched.engine.lora.layers import LoraLinear
from kvsched.engine.lora.registry import LoraRegistry


class AdapterResidency:
    """The device-resident adapters (LRU order, core/lora_residency.py) and the layers their deltas
    are installed in."""

    __slots__ = ("registry", "peft", "device", "layers", "lru", "num_loads", "num_evictions")

    def __init__(
        self,
        registry: LoraRegistry,
        peft: PeftCache,
        layers: dict[tuple[int, str], LoraLinear],
        device: torch.device,
    ) -> None:
        self.registry = registry
        self.peft = peft
        self.device = device
        #: (layer, module) -> its wrapper, for every module some adapter targets.
        self.layers = layers
        #: The resident adapters and their pages, least recently used first (the simulator's policy too).
        self.lru = AdapterLRU()
        self.num_loads = 0
        self.num_evictions = 0

    @property
    def resident(self) -> dict[int, int]:
        """adapter id -> pages, least recently used first."""
        return self.lru.resident

    @property
    def resident_pages(self) -> int:
        return self.lru.pages

    def prepare(self, lora_ids: Iterable[int | None]) -> None:
        """Make the step's adapters resident (copy-in, LRU eviction of unpinned ones)."""
        needed = {i for i in lora_ids if i is not None}
        lru = self.lru
        for lora_id in needed:
            lru.touch(lora_id)
        for lora_id in sorted(needed - lru.resident.keys()):
            pages = self.registry.pages(lora_id)
            self._make_room(pages, needed)
            self._load(lora_id)
            lru.add(lora_id, pages)

    def forget(self, lora_id: int) -> None:
        """Drop an adapter being unloaded from the device (if resident)."""
        if lora_id in self.lru:
            self.lru.remove(lora_id)
            self._drop(lora_id)

    def _make_room(self, pages: int, needed: set[int]) -> None:
        budget = self.peft.max_device_pages
        for victim in self.lru.evict(budget, pages, needed, self.peft.is_pinned):
            self._drop(victim)
        if self.lru.pages + pages > budget:
            raise KVSchedError(
                f"LoRA adapters of this step need more than max_device_pages={budget} "
                f"(resident: {dict(self.resident)}, adding {pages})"
            )

    def _load(self, lora_id: int) -> None:
        for key, (a, b) in self.registry.adapters[lora_id].weights.items():
            self.layers[key].deltas[lora_id] = (
                a.to(self.device, non_blocking=True),
                b.to(self.device, non_blocking=True),
            )
        self.num_loads += 1

    def _drop(self, lora_id: int) -> None:
        """Remove an evicted adapter's deltas from the layers."""
        for key in self.registry.adapters[lora_id].weights:
            self.layers[key].deltas.pop(lora_id, None)
        self.num_evictions += 1
