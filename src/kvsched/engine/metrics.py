"""Engine-wide counters: steps, tokens, KV usage per tier, and the KV manager's own stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvsched.core.request import Request


@dataclass(slots=True)
class EngineStats:
    """Accumulated over the engine's life; ``kv`` is the manager's latest ``stats()`` snapshot."""

    num_steps: int = 0
    num_context_tokens: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_paused: int = 0  # suspended to the host tier, KV kept (unified scheduler)
    num_preempted: int = 0  # KV dropped and recomputed (two-stage MAX_UTILIZATION, recompute)
    peak_device_usage: float = 0.0
    peak_host_blocks_used: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    # Speculative decoding (vLLM's spec_decode counters): verify steps, drafts proposed and accepted.
    num_speculative_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    kv: Any = None

    def record_speculation(self, proposed: int, accepted: int) -> None:
        self.num_speculative_steps += 1
        self.num_draft_tokens += proposed
        self.num_accepted_draft_tokens += accepted

    @property
    def acceptance_rate(self) -> float | None:
        n = self.num_draft_tokens
        return None if n == 0 else self.num_accepted_draft_tokens / n

    def record_step(self, out: Any, num_sampled: int, kv: Any) -> None:
        self.num_steps += 1
        self.num_context_tokens += sum(r.context_chunk_size for r in out.context_requests)
        self.num_generated_tokens += num_sampled
        usage = 1.0 - kv.num_free_device_blocks / kv.num_device_blocks
        self.peak_device_usage = max(self.peak_device_usage, usage)
        if kv.num_host_blocks:
            self.peak_host_blocks_used = max(
                self.peak_host_blocks_used, kv.num_host_blocks - kv.num_free_host_blocks
            )

    def record_schedule(self, out: Any) -> None:
        """Suspensions and preemptions of every scheduling pass, a pass that ran no batch included."""
        self.num_paused += len(out.paused_requests)
        self.num_preempted += len(out.preempted_requests)

    def record_finish(self, req: Request) -> None:
        self.num_finished += 1
        reason = req.finish_reason or "unknown"
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def snapshot(self, kv: Any) -> EngineStats:
        """Refresh ``kv`` from the manager and return self."""
        self.kv = kv.stats()
        return self
