"""Real KV tensors for both tiers, and batched block copies between them (engine side: uses torch).

Per layer, ``device_kv[layer]`` and ``host_kv[layer]`` are ``[num_blocks, 2, tokens_per_block,
num_kv_heads, head_dim]`` (index 0 = K, 1 = V). The engine writes position ``p`` of a request at
``device_kv[l][table[p // tpb], :, p % tpb]``. With a CUDA device the host tier is pinned and copies
go through one pinned staging buffer: one gather per layer, one transfer for all layers, one scatter
per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import Tier


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: must be an integer > 0")
    return value


def _runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` of the runs where both id lists count up by one."""
    runs = []
    a, b, k = src[0], dst[0], 1
    for s, d in zip(src[1:], dst[1:]):
        if s == a + k and d == b + k:
            k += 1
        else:
            runs.append((a, b, k))
            a, b, k = s, d, 1
    runs.append((a, b, k))
    return runs


class TensorKVStorage:
    """KV data of every layer on the device tier and the host tier."""

    def __init__(
        self,
        cache_config: CacheConfig,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(cache_config, CacheConfig):
            raise ConfigError(f"cache_config must be a CacheConfig, got {type(cache_config).__name__}")
        self.num_layers = _positive("num_layers", num_layers)
        _positive("num_kv_heads", num_kv_heads)
        _positive("head_dim", head_dim)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype={dtype!r} is invalid: must be a torch.dtype")
        self.device = torch.device(device)
        self.num_device_blocks = cache_config.num_device_blocks
        self.num_host_blocks = cache_config.num_host_blocks
        block_shape = (2, cache_config.tokens_per_block, num_kv_heads, head_dim)
        self.block_shape = block_shape
        self.dtype = dtype
        self._cuda = self.device.type == "cuda"
        self.device_kv: list[torch.Tensor] = [
            torch.zeros((self.num_device_blocks, *block_shape), dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.host_kv: list[torch.Tensor] = [
            torch.zeros((self.num_host_blocks, *block_shape), dtype=dtype, pin_memory=self._cuda)
            for _ in range(num_layers)
        ]
        elem = torch.empty((), dtype=dtype).element_size()
        self._bytes_per_block = num_layers * elem * 2 * block_shape[1] * num_kv_heads * head_dim
        self._block_numel = 2 * block_shape[1] * num_kv_heads * head_dim
        self._staging: torch.Tensor | None = None
        self._staging_free: torch.cuda.Event | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        return self._bytes_per_block

    def tier_kv(self, tier: Tier) -> list[torch.Tensor]:
        return self.device_kv if tier == Tier.DEVICE else self.host_kv

    def copy_blocks(self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int]) -> None:
        """Copy blocks ``src[i]`` of ``src_tier`` to ``dst[i]`` of ``dst_tier``, all layers, batched."""
        n = len(src)
        if n != len(dst):
            raise ValueError(f"copy_blocks: {n} sources but {len(dst)} destinations")
        if n == 0:
            return
        src_kv, dst_kv = self.tier_kv(src_tier), self.tier_kv(dst_tier)
        src_dev, dst_dev = src_kv[0].device, dst_kv[0].device
        if src_dev == dst_dev:
            runs = _runs(src, dst)
            if len(runs) * 4 <= n:  # mostly consecutive ids: plain slice copies (memcpy speed)
                for s, d in zip(src_kv, dst_kv):
                    for a, b, k in runs:
                        d[b : b + k].copy_(s[a : a + k])
                return
        src_idx = torch.tensor(src, dtype=torch.long, device=src_dev)
        dst_idx = torch.tensor(dst, dtype=torch.long, device=dst_dev)
        if src_dev == dst_dev:
            for s, d in zip(src_kv, dst_kv):
                d.index_copy_(0, dst_idx, s.index_select(0, src_idx))
            return
        staging = self._stage(n)
        if dst_dev.type == "cpu":  # device -> host
            gathered = torch.empty((self.num_layers, n, *self.block_shape), dtype=self.dtype, device=src_dev)
            for layer, s in enumerate(src_kv):
                torch.index_select(s, 0, src_idx, out=gathered[layer])
            staging.copy_(gathered, non_blocking=True)
            torch.cuda.current_stream(src_dev).synchronize()  # the CPU reads the staging buffer next
            for layer, d in enumerate(dst_kv):
                d.index_copy_(0, dst_idx, staging[layer])
        else:  # host -> device
            for layer, s in enumerate(src_kv):
                torch.index_select(s, 0, src_idx, out=staging[layer])
            on_device = staging.to(dst_dev, non_blocking=True)
            for layer, d in enumerate(dst_kv):
                d.index_copy_(0, dst_idx, on_device[layer])
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dst_dev))
            self._staging_free = event  # the staging buffer may be rewritten once this has passed

    def _stage(self, n: int) -> torch.Tensor:
        """A pinned ``[layers, n, ...]`` staging view, safe to write (the last upload has finished)."""
        if self._staging_free is not None:
            self._staging_free.synchronize()
            self._staging_free = None
        numel = self.num_layers * n * self._block_numel
        if self._staging is None or self._staging.numel() < numel:
            cap = 1 << max(n - 1, 0).bit_length()
            self._staging = torch.empty(
                self.num_layers * cap * self._block_numel, dtype=self.dtype, pin_memory=True
            )
        # A contiguous prefix of the flat buffer, so transfers stay single async copies.
        return self._staging[:numel].view(self.num_layers, n, *self.block_shape)
