"""A metadata-only KV storage backend that counts the blocks copied in each direction.

The manager calls `copy_blocks` for every suspend, resume, host-tier prefix hit and cached-block
offload; counting here gives the simulator each step's host<->device traffic without snapshotting the
manager's stats every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvsched.core.errors import ConfigError


class CountingStorage:
    """Holds no data; `d2h_blocks` / `h2d_blocks` / `copy_calls` only grow (tiers: 0 = device, 1 = host)."""

    __slots__ = ("bytes_per_block", "d2h_blocks", "h2d_blocks", "copy_calls")

    def __init__(self, bytes_per_block: int = 0) -> None:
        if not isinstance(bytes_per_block, int) or bytes_per_block < 0:
            raise ConfigError(f"bytes_per_block={bytes_per_block!r} is invalid: must be an integer >= 0")
        self.bytes_per_block = bytes_per_block
        self.d2h_blocks = 0
        self.h2d_blocks = 0
        self.copy_calls = 0  # calls that moved blocks between tiers (a per-call cost in LinearCostModel)

    def copy_blocks(self, src_tier: int, src: Sequence[int], dst_tier: int, dst: Sequence[int]) -> None:
        if len(src) != len(dst):
            raise ValueError(f"copy_blocks: {len(src)} sources but {len(dst)} destinations")
        if src_tier == dst_tier or not src:
            return
        self.copy_calls += 1
        if int(dst_tier) == 1:
            self.d2h_blocks += len(src)
        else:
            self.h2d_blocks += len(src)
