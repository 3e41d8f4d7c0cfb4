"""Validated configuration shared by the engine, the simulator and the CLI: the scheduler kinds and
capacity policies (listed once here) and the one validation of scheduler options."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Literal, get_args

from kvsched.core.errors import ConfigError

SchedulerKind = Literal["unified", "two-stage", "recompute"]
#: The scheduler names, listed once: make_scheduler, EngineArgs, the CLI flags and the simulator use it.
SCHEDULER_KINDS: tuple[str, ...] = get_args(SchedulerKind)
#: The schedulers that take a capacity policy (the recompute baseline has no capacity stage).
CAPACITY_POLICY_KINDS: tuple[str, ...] = ("two-stage",)


class CapacityPolicy(Enum):
    """How the two-stage capacity stage decides which requests fit in KV memory."""

    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"
    STATIC_BATCH = "static_batch"

    @classmethod
    def parse(cls, value: CapacityPolicy | str) -> CapacityPolicy:
        """Accept a member or its lowercase name (``"max_utilization"``; dashes allowed)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == key:
                    return member
        raise ConfigError(
            f"capacity_policy={value!r} is invalid: must be a CapacityPolicy or one of "
            f"{', '.join(CAPACITY_POLICIES)}"
        )


CAPACITY_POLICIES: tuple[str, ...] = tuple(m.value for m in CapacityPolicy)


def _require(cond: bool, field_name: str, value: object, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is invalid: {rule}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_budgets(max_batch_size: int, max_num_tokens: int | None, chunk_unit_size: int | None) -> None:
    """The per-step budgets: positive integers; None means unlimited tokens / no chunked prefill.

    A zero budget would schedule nothing, ever: the engine would wait forever, so it is refused.
    """
    _require(
        _is_int(max_batch_size) and max_batch_size > 0,
        "max_batch_size",
        max_batch_size,
        "must be an integer >= 1",
    )
    _require(
        max_num_tokens is None or (_is_int(max_num_tokens) and max_num_tokens > 0),
        "max_num_tokens",
        max_num_tokens,
        "must be an integer >= 1 or None (unlimited)",
    )
    _require(
        chunk_unit_size is None or (_is_int(chunk_unit_size) and chunk_unit_size > 0),
        "chunk_unit_size",
        chunk_unit_size,
        "must be an integer >= 1 or None (no chunked prefill)",
    )


def check_capacity_policy(scheduler: str, policy: CapacityPolicy | str | None) -> CapacityPolicy | None:
    """The policy ``scheduler`` runs with: MAX_UTILIZATION when none is given to a scheduler that takes one.

    A policy given to a scheduler without a capacity stage would be silently ignored; it is refused.
    """
    chosen = None if policy is None else CapacityPolicy.parse(policy)
    if scheduler not in CAPACITY_POLICY_KINDS:
        if chosen is not None:
            raise ConfigError(
                f"capacity_policy={chosen.value!r} is not accepted by scheduler={scheduler!r}: "
                f"capacity_policy applies to the {' and '.join(CAPACITY_POLICY_KINDS)} scheduler only"
            )
        return None
    return chosen or CapacityPolicy.MAX_UTILIZATION


def validate_scheduler_options(
    scheduler: str,
    *,
    max_batch_size: int,
    max_num_tokens: int | None = None,
    chunk_unit_size: int | None = None,
    capacity_policy: CapacityPolicy | str | None = None,
) -> CapacityPolicy | None:
    """The one validation of scheduler configuration (SchedulerConfig, make_scheduler, the engine).

    Returns the capacity policy the scheduler runs with (None for the kinds that take none).
    """
    _require(
        scheduler in SCHEDULER_KINDS, "scheduler", scheduler, f"must be one of {', '.join(SCHEDULER_KINDS)}"
    )
    check_budgets(max_batch_size, max_num_tokens, chunk_unit_size)
    return check_capacity_policy(scheduler, capacity_policy)


@dataclass(slots=True)
class CacheConfig:
    """Shape of the paged KV cache: block size, blocks per tier, prefix reuse."""

    tokens_per_block: int = 16
    num_device_blocks: int = 1024
    num_host_blocks: int = 0
    enable_block_reuse: bool = False
    # Resume is refused above this device utilisation (headroom for growth, avoids suspend/resume thrash).
    max_util_for_resume: float = 1.0
    # KV events (stored/removed blocks, for KV-aware routers); off skips building them (simulations).
    enable_kv_events: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.tokens_per_block, int) and self.tokens_per_block > 0,
            "tokens_per_block",
            self.tokens_per_block,
            "must be an integer > 0",
        )
        _require(
            isinstance(self.num_device_blocks, int) and self.num_device_blocks > 0,
            "num_device_blocks",
            self.num_device_blocks,
            "must be an integer > 0",
        )
        _require(
            isinstance(self.num_host_blocks, int) and self.num_host_blocks >= 0,
            "num_host_blocks",
            self.num_host_blocks,
            "must be an integer >= 0 (0 = no host tier)",
        )
        _require(
            0.0 < self.max_util_for_resume <= 1.0,
            "max_util_for_resume",
            self.max_util_for_resume,
            "must be in (0, 1]",
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(slots=True)
class SchedulerConfig:
    """Per-step budgets and the choice of scheduler."""

    scheduler: SchedulerKind = "unified"
    max_batch_size: int = 64
    max_num_tokens: int | None = 2048
    chunk_unit_size: int | None = None
    # Two-stage only (guaranteed_no_evict | max_utilization | static_batch); None = not given, which
    # two-stage runs as max_utilization. Given to another scheduler it is a ConfigError.
    capacity_policy: str | None = None
    priority_mode: bool = False

    def __post_init__(self) -> None:
        validate_scheduler_options(
            self.scheduler,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            chunk_unit_size=self.chunk_unit_size,
            capacity_policy=self.capacity_policy,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
