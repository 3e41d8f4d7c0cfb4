"""LoRA page budget for the baseline schedulers (the unified pass inlines the same rules)."""

from __future__ import annotations

from kvsched.core.protocols import PeftPages
from kvsched.core.request import Request


class PageBudget:
    """Distinct adapters' pages claimed this step against ``peft_cache.max_device_pages``."""

    __slots__ = ("_peft", "_max", "claimed", "_ids")

    def __init__(self, peft: PeftPages | None) -> None:
        self._peft = peft
        self._max = 0 if peft is None else peft.max_device_pages
        self.claimed = 0
        self._ids: set[int] = set()

    def need(self, req: Request) -> int | None:
        """Pages ``req`` would add (0 if none or already counted); None when they do not fit."""
        lora = req.lora_id
        if self._peft is None or lora is None or lora in self._ids:
            return 0
        pages = self._peft.num_pages(req)
        return None if self.claimed + pages > self._max else pages

    def commit(self, req: Request, pages: int) -> None:
        """Count ``pages`` (from :meth:`need`) as claimed by ``req``'s adapter."""
        lora = req.lora_id
        if pages and lora is not None:
            self.claimed += pages
            self._ids.add(lora)
