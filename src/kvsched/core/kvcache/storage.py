"""Storage backends: where block data lives. The manager only asks them to copy blocks between tiers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import Tier

#: What a backend's ``copy_blocks`` raises when a copy fails at run time: torch reports device
#: faults and out-of-memory as ``RuntimeError`` (``torch.OutOfMemoryError`` is one), an I/O-backed
#: tier ``OSError``, an allocation ``MemoryError``. A ``ValueError`` / ``IndexError`` / ``TypeError``
#: (mismatched lengths, a slot outside the pool) is a caller bug, not a failed copy.
COPY_ERRORS: tuple[type[Exception], ...] = (RuntimeError, OSError, MemoryError)


@runtime_checkable
class KVStorage(Protocol):
    """What the manager needs from a backend: the size of a block and a batched cross-tier copy."""

    @property
    def bytes_per_block(self) -> int: ...

    def copy_blocks(
        self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int], /
    ) -> None: ...


@runtime_checkable
class TieredKVStorage(KVStorage, Protocol):
    """A backend with fixed pools (tensors): the manager checks they hold the config's blocks."""

    @property
    def num_device_blocks(self) -> int: ...

    @property
    def num_host_blocks(self) -> int: ...


class MetadataStorage:
    """No data at all (simulation): copies are free, but their bytes are still counted in the stats."""

    __slots__ = ("bytes_per_block", "num_copies")

    def __init__(self, bytes_per_block: int = 0) -> None:
        if not isinstance(bytes_per_block, int) or bytes_per_block < 0:
            raise ConfigError(f"bytes_per_block={bytes_per_block!r} is invalid: must be an integer >= 0")
        self.bytes_per_block = bytes_per_block
        self.num_copies = 0

    def copy_blocks(self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int]) -> None:
        if len(src) != len(dst):
            raise ValueError(f"copy_blocks: {len(src)} sources but {len(dst)} destinations")
        self.num_copies += 1
