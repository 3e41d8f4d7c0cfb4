"""Validated configuration dataclasses shared by the engine, the simulator and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from kvsched.core.errors import ConfigError

SchedulerKind = Literal["unified", "two-stage", "recompute"]


def _require(cond: bool, field_name: str, value: object, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is invalid: {rule}")


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
    capacity_policy: str = (
        "max_utilization"  # two-stage only: guaranteed_no_evict | max_utilization | static_batch
    )
    priority_mode: bool = False

    def __post_init__(self) -> None:
        _require(
            self.scheduler in ("unified", "two-stage", "recompute"),
            "scheduler",
            self.scheduler,
            "must be one of unified, two-stage, recompute",
        )
        _require(
            isinstance(self.max_batch_size, int) and self.max_batch_size > 0,
            "max_batch_size",
            self.max_batch_size,
            "must be an integer > 0",
        )
        _require(
            self.max_num_tokens is None or self.max_num_tokens > 0,
            "max_num_tokens",
            self.max_num_tokens,
            "must be > 0 or None (unlimited)",
        )
        _require(
            self.chunk_unit_size is None or self.chunk_unit_size > 0,
            "chunk_unit_size",
            self.chunk_unit_size,
            "must be > 0 or None (no chunking)",
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
