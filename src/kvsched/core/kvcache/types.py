"""Small value types of the KV-cache manager: tiers, KV events and the stats snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class Tier(IntEnum):
    """Cache tiers, warm to cold. Internally the manager uses the plain ints (faster comparisons)."""

    DEVICE = 0
    HOST = 1


DEVICE = 0
HOST = 1


class KVEvent(NamedTuple):
    """A change of the set of reusable blocks, for KV-aware routers.

    ``kind`` is ``"stored"`` (a block became reusable on ``tier``) or ``"removed"`` (it left ``tier``).
    A move between tiers is a ``removed`` on the old tier followed by a ``stored`` on the new one.
    ``block_hash`` is the SHA-256 chain key; ``parent_hash`` is None for the first block of a chain.
    A NamedTuple, not a frozen dataclass: one is built per published block, and this is 5x cheaper.
    """

    kind: str
    block_hash: bytes
    tier: Tier
    parent_hash: bytes | None = None


@dataclass(slots=True)
class KVCacheStats:
    """Counters since construction plus a snapshot of the pools (blocks per tier).

    free + used + cached == total on each tier; ``used`` blocks are held by requests (active or
    suspended), ``cached`` blocks are held by nobody but kept for reuse (evicted LRU on demand).
    """

    num_device_blocks: int = 0
    num_host_blocks: int = 0
    free_device_blocks: int = 0
    used_device_blocks: int = 0
    cached_device_blocks: int = 0
    free_host_blocks: int = 0
    used_host_blocks: int = 0
    cached_host_blocks: int = 0
    active_device_blocks: int = 0
    num_requests: int = 0
    num_active_requests: int = 0
    allocated_blocks: int = 0
    reuse_hit_blocks_device: int = 0
    reuse_hit_blocks_host: int = 0
    reuse_hit_tokens_device: int = 0
    reuse_hit_tokens_host: int = 0
    reuse_miss_blocks: int = 0
    reuse_miss_tokens: int = 0
    num_suspends: int = 0
    num_resumes: int = 0
    offload_blocks: int = 0
    offload_bytes: int = 0
    onboard_blocks: int = 0
    onboard_bytes: int = 0
    dropped_device_blocks: int = 0
    dropped_host_blocks: int = 0
    num_events: int = 0

    @property
    def reuse_hit_blocks(self) -> int:
        return self.reuse_hit_blocks_device + self.reuse_hit_blocks_host

    @property
    def reuse_hit_tokens(self) -> int:
        return self.reuse_hit_tokens_device + self.reuse_hit_tokens_host

    @property
    def reuse_hit_rate(self) -> float:
        """Hit blocks / looked-up full blocks (0.0 before any lookup)."""
        total = self.reuse_hit_blocks + self.reuse_miss_blocks
        return self.reuse_hit_blocks / total if total else 0.0

    @property
    def copied_blocks(self) -> int:
        return self.offload_blocks + self.onboard_blocks

    @property
    def copied_bytes(self) -> int:
        return self.offload_bytes + self.onboard_bytes
