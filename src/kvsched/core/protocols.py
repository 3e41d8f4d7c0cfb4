"""The typed seams between the areas (docs/architecture.md, "The seams"), in one place.

Each protocol lists only the members its consumer calls, so a test fake that implements them is a
drop-in (tests/core/scheduler/sched_fakes.py). They are ``runtime_checkable`` for cheap structural
checks at construction time and in tests (``isinstance`` checks names only; mypy checks signatures).

- :class:`SchedulingKV` — the KV manager as the schedulers see it (the scheduling API of
  TensorRT-LLM's KVCacheManagerV2, PR #11939), provided by :class:`~kvsched.core.kvcache.KVCacheManager`.
- :class:`StepKV` — what :func:`kvsched.core.step.apply_step` and ``finish_request`` call on it.
- :class:`PeftPages` — the LoRA page budget (:class:`~kvsched.core.peft.PeftCache`).
- :class:`~kvsched.core.kvcache.storage.KVStorage` — where block data lives (re-exported here).
- :class:`Scheduler` — what the step loop (:class:`~kvsched.core.loop.StepLoop`) calls on a scheduler.
- :class:`StepRunner` — runs one scheduled batch for :class:`~kvsched.core.loop.StepLoop` (engine:
  model + sampler; simulator: cost model + virtual clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, Protocol, runtime_checkable

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.storage import KVStorage, TieredKVStorage
from kvsched.core.request import Request

if TYPE_CHECKING:  # the scheduler package imports this module: no runtime import back
    from kvsched.core.scheduler.output import SchedulerOutput

__all__ = [
    "KVStorage",
    "PeftPages",
    "Scheduler",
    "SchedulingKV",
    "StepKV",
    "StepRunner",
    "TieredKVStorage",
    "missing_members",
    "require",
]


@runtime_checkable
class StepKV(Protocol):
    """The KV manager as the step update sees it: KV was written, or a request is done with it."""

    def advance(self, req: Request, num_tokens: int, /) -> None:
        """``num_tokens`` more tokens of ``req``'s KV were written this step."""

    def free_request(self, req: Request, /) -> None:
        """Release everything ``req`` holds; UnknownRequestError if it has no KV."""


@runtime_checkable
class SchedulingKV(Protocol):
    """The KV manager as the schedulers see it (allocation happens inside the scheduling pass).

    The unified pass uses the allocation calls, ``suspend_request``/``is_request_active``/
    ``can_suspend`` (a victim the host cannot take is preempted with ``free_request`` instead), and
    ``capacity``/``revert`` so that ``UnifiedScheduler.drop_scheduled`` can undo a step; the
    baselines use ``free_request`` (preemption by recompute) and two-stage reads
    ``num_free_device_blocks`` (its capacity stage).
    A draft-model KV manager is one of these too (``suspend_request`` / ``free_request``).
    """

    @property
    def tokens_per_block(self) -> int: ...

    @property
    def num_free_device_blocks(self) -> int: ...

    def prepare_context(self, req: Request, /) -> bool:
        """First chunk: create the cache (with prefix lookup) or resume it; never grows."""
        ...

    def resize_context(self, req: Request, num_tokens: int, /) -> bool:
        """Grow capacity to ``context_current_position + num_tokens``; never shrinks."""
        ...

    def try_allocate_generation(self, req: Request, /) -> bool:
        """Resume if suspended, then make room for ``1 + len(draft_tokens)`` tokens."""
        ...

    def suspend_request(self, req: Request, /) -> None:
        """Move the request's KV to the host tier (kept); no-op if not active."""

    def is_request_active(self, request_id: int, /) -> bool:
        """A cache exists for the request and is on the device."""
        ...

    def can_suspend(self, req: Request, /) -> bool:
        """``suspend_request`` would free the request's device blocks now (the host has room)."""
        ...

    def free_request(self, req: Request, /) -> None:
        """Release everything the request holds (recompute preemption)."""

    def capacity(self, req: Request, /) -> int:
        """Tokens of KV the request may hold now."""
        ...

    def revert(self, req: Request, capacity: int, /) -> None:
        """Shrink capacity back to ``max(history, capacity)`` (a step grown, then dropped)."""


@runtime_checkable
class PeftPages(Protocol):
    """LoRA adapters as the schedulers budget them: device pages, and who pins each adapter."""

    @property
    def max_device_pages(self) -> int: ...

    def num_pages(self, req: Request, /) -> int:
        """Device pages ``req``'s adapter needs (0 without LoRA)."""
        ...

    def acquire(self, req: Request, /) -> None:
        """``req`` was scheduled with its adapter: the adapter must stay on the device."""

    def release(self, req: Request, /) -> None:
        """``req`` was suspended or finished: it no longer pins its adapter."""


@runtime_checkable
class Scheduler(Protocol):
    """One scheduling step over the unfinished requests (called by ``StepLoop`` for engine and simulator)."""

    def schedule(
        self, active_requests: Sequence[Request], inflight_request_ids: Iterable[int] = frozenset()
    ) -> SchedulerOutput:
        """Decide this step's batch, allocating its KV; requests in ``inflight_request_ids`` are skipped."""
        ...


@runtime_checkable
class StepRunner(Protocol):
    """Executes one scheduled batch for the step loop (engine: forward + sampler; simulator: cost model).

    Any callable of this shape is one (a bound method, a function); it must not change request state
    itself: :func:`kvsched.core.step.apply_step` applies what it returns.
    """

    def __call__(self, output: SchedulerOutput, /) -> Mapping[int, Sequence[int]]:
        """Tokens per scheduled request id: none for a non-last context chunk, else 1 + accepted drafts."""
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, sorted (empty when it conforms by name)."""
    names = {
        name
        for cls in protocol.__mro__
        if cls not in (Protocol, Generic, object)
        for name in vars(cls)
        if not name.startswith("_")
    }
    return sorted(name for name in names if not hasattr(obj, name))


def require(what: str, obj: object, protocol: type) -> None:
    """Refuse a seam object that lacks members of ``protocol`` with a ConfigError naming them.

    Checked once at construction, so a wrong object fails there instead of in the middle of a step.
    """
    missing = missing_members(obj, protocol)
    if missing:
        raise ConfigError(
            f"{what} must provide {protocol.__name__}: {type(obj).__name__} lacks {', '.join(missing)}"
        )
