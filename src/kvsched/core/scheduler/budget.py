"""What one step of the unified pass has spent: tokens, batch slots and LoRA pages.

The generation phase fills it and the context phase continues from it. One instance lives on each
scheduler and is reset every step, so the hot path allocates nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvsched.core.request import Request


@dataclass(slots=True)
class StepBudget:
    max_tokens: int
    max_reqs: int
    max_pages: int = 0
    num_tokens: int = 0
    num_reqs: int = 0
    #: LoRA pages claimed this step, and the adapters they belong to (each adapter counts once).
    pages: int = 0
    lora_ids: set[int] = field(default_factory=set)
    #: A scheduled request carries an adapter: the output is then sorted by adapter.
    has_lora: bool = False

    def reset(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.num_tokens = self.num_reqs = self.pages = 0
        if self.lora_ids:
            self.lora_ids.clear()
        self.has_lora = False

    def claim_resident(self, req: Request, num_pages: int) -> None:
        """Pages of an adapter that stays resident this step anyway (its request is finishing)."""
        lora = req.lora_id
        if lora is not None and lora not in self.lora_ids:
            self.pages += num_pages
            self.lora_ids.add(lora)

    def lora_pages(self, req: Request, peft: object) -> int:
        """Pages ``req``'s adapter would add (0 if already counted or without a PEFT cache), or -1
        when they do not fit. Nothing is claimed until :meth:`commit_pages`."""
        self.has_lora = True
        if peft is None or req.lora_id in self.lora_ids:
            return 0
        n: int = peft.num_pages(req)  # type: ignore[attr-defined]
        return n if self.pages + n <= self.max_pages else -1

    def commit_pages(self, lora: int, pages: int) -> None:
        """The request holding ``pages`` was scheduled: claim them for its adapter."""
        if pages:
            self.pages += pages
            self.lora_ids.add(lora)
