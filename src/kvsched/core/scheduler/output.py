"""What one scheduling step hands to the executor."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvsched.core.request import Request


@dataclass(slots=True)
class SchedulerOutput:
    """The requests to run this step and the ones displaced by it.

    ``paused_requests`` were suspended to the host tier (KV kept; the unified scheduler resumes them by
    itself). ``preempted_requests`` lost their KV (``free_request`` + ``reset_for_recompute`` were done)
    and will prefill again. Neither list needs any action from the executor.
    """

    context_requests: list[Request] = field(default_factory=list)
    generation_requests: list[Request] = field(default_factory=list)
    paused_requests: list[Request] = field(default_factory=list)
    preempted_requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: int = 0

    @property
    def num_fitting_requests(self) -> int:
        return len(self.context_requests) + len(self.generation_requests)

    @property
    def is_empty(self) -> bool:
        return not self.context_requests and not self.generation_requests
