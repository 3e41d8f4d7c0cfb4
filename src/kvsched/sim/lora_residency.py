"""LoRA adapters on a simulated replica's device: the step's adapter shape and residency (LRU, PEFT budget).

Split out of replica.py (one job per module); `Replica._run` calls `lora_step` only when a LoRA request
was admitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvsched.core.scheduler import SchedulerOutput
from kvsched.sim.cost import StepShape

if TYPE_CHECKING:
    from kvsched.sim.replica import Replica

__all__ = ["lora_step"]


def lora_step(rep: Replica, out: SchedulerOutput, shape: StepShape) -> None:
    """The step's adapter tokens and distinct adapters; an adapter not resident is loaded (its bytes
    copied host -> device), then least-recently-used adapters no scheduled request pins are evicted
    while the resident pages exceed the PEFT budget: the engine's policy (core/lora_residency.py)."""
    step: dict[int, int] = {}
    tokens = 0
    peft = rep.peft
    for rs, ctx in ((out.context_requests, True), (out.generation_requests, False)):
        for r in rs:
            lora = r.lora_id
            if lora is None:
                continue
            tokens += r.context_chunk_size if ctx else 1 + len(r.draft_tokens)
            if lora not in step:
                step[lora] = 1 if peft is None else peft.num_pages(r)
    if not step:
        return
    shape.lora_tokens = tokens
    shape.lora_adapters = len(step)
    lru = rep.resident
    for lora, pages in step.items():
        if not lru.touch(lora):
            rep.lora_loads += 1
            shape.lora_load_bytes += rep._adapter_bytes
            lru.add(lora, pages)
    if peft is not None and peft.max_device_pages > 0:
        lru.evict(peft.max_device_pages, 0, step, peft.is_pinned)
