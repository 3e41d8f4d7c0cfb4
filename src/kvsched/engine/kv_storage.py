"""Real KV tensors for both tiers, and batched block copies between them (engine side: uses torch).

Layouts (block shape ``[2, tokens_per_block, num_kv_heads, head_dim]``, index 0 = K, 1 = V):

- device: one allocation ``device_pool[layer, block]``; ``device_kv[layer]`` is its contiguous
  ``[num_blocks, 2, tpb, heads, dim]`` slice, the layout paged attention reads (and views flat).
  The engine writes position ``p`` of a request at ``device_kv[l][table[p // tpb], :, p % tpb]``.
- host: block-major ``host_blocks[block, layer]``: one host block is one contiguous region holding
  every layer, so a host block is copied in one piece whatever its id. ``host_kv[layer]`` is a
  per-layer (strided) view kept for readers that index by layer.

Why: suspend, resume and host-tier prefix hits copy blocks whose ids are scattered once the pools
fragment. Per-layer gathers and scatters (``index_select`` + ``index_copy_``) touch every byte twice
and ``index_copy_`` runs element by element on CPU; copying one host block from/to the
``device_pool[:, block]`` view is one call per block instead (a memcpy per layer inside it),
whatever the ids. With a CUDA device the host tier and a staging buffer are pinned and the
transfer runs on a side stream: one gather on the device, one transfer for the whole batch, one
contiguous copy per host block. (SGLang's HiCache offers the same page-first host layout,
``--hicache-mem-layout page_first``, for the same reason: I/O efficiency.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache.types import Tier
from kvsched.engine.block_copy import copy_rows
from kvsched.engine.lazy_zeros import lazy_zeros


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: must be an integer > 0")
    return value


def _check_ids(name: str, ids: Sequence[int], size: int) -> None:
    """Out-of-range ids would otherwise wrap (negative) or fail deep inside torch or numpy."""
    if min(ids) < 0 or max(ids) >= size:
        bad = next(i for i in ids if not 0 <= i < size)
        raise IndexError(f"copy_blocks: {name} block id {bad} is outside the pool of {size} blocks")


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
        # lazy_zeros: a CPU pool commits memory only for the blocks that get written.
        self.device_pool = lazy_zeros(
            (num_layers, self.num_device_blocks, *block_shape), dtype=dtype, device=self.device
        )
        self.device_kv: list[torch.Tensor] = list(self.device_pool.unbind(0))
        self.host_blocks = lazy_zeros(
            (self.num_host_blocks, num_layers, *block_shape), dtype=dtype, pin_memory=self._cuda
        )
        self.host_kv: list[torch.Tensor] = list(self.host_blocks.unbind(1))
        # Host-side copies go through block-major numpy byte views of the same memory (see
        # block_copy.py): memcpy per layer run, no OpenMP region per block (torch's parallel copy_
        # pays a barrier per call, which collapses when other processes load the cores), and any
        # dtype copies bit-exact.
        self._host_np = self.host_blocks.view(torch.uint8).numpy()  # [block, layer, ...] contiguous
        self._device_np = (
            None if self._cuda else self.device_pool.view(torch.uint8).numpy().swapaxes(0, 1)
        )  # [block, layer, ...] strided
        elem = torch.empty((), dtype=dtype).element_size()
        self._block_numel = 2 * block_shape[1] * num_kv_heads * head_dim
        self._bytes_per_block = num_layers * elem * self._block_numel
        self._staging: torch.Tensor | None = None
        self._staging_free: torch.cuda.Event | None = None
        self._stream: torch.cuda.Stream | None = None
        #: Called with no arguments at the start of every :meth:`copy_blocks`, before any block moves:
        #: async scheduling (engine/overlap.py) waits there for the forward in flight, which may still
        #: read or write the blocks being copied. None: no call.
        self.before_copy: Callable[[], None] | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        return self._bytes_per_block

    def tier_kv(self, tier: Tier) -> list[torch.Tensor]:
        """Per-layer ``[num_blocks, ...]`` tensors of a tier (host ones are strided views)."""
        return self.device_kv if tier == Tier.DEVICE else self.host_kv

    def copy_blocks(self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int]) -> None:
        """Copy blocks ``src[i]`` of ``src_tier`` to ``dst[i]`` of ``dst_tier``, all layers."""
        if self.before_copy is not None:
            self.before_copy()
        n = len(src)
        if n != len(dst):
            raise ValueError(f"copy_blocks: {n} sources but {len(dst)} destinations")
        if n == 0:
            return
        _check_ids("source", src, self._pool_size(src_tier))
        _check_ids("destination", dst, self._pool_size(dst_tier))
        if src_tier == dst_tier:
            self._copy_within(src_tier, src, dst)
        elif self._cuda:
            if dst_tier == Tier.HOST:
                self._download(src, dst)
            else:
                self._upload(src, dst)
        elif dst_tier == Tier.HOST:
            copy_rows(self._host_np, self._device_np, dst, src, self._bytes_per_block)  # type: ignore[arg-type]
        else:
            copy_rows(self._device_np, self._host_np, dst, src, self._bytes_per_block)  # type: ignore[arg-type]

    def _pool_size(self, tier: Tier) -> int:
        return self.num_device_blocks if tier == Tier.DEVICE else self.num_host_blocks

    def _copy_within(self, tier: Tier, src: Sequence[int], dst: Sequence[int]) -> None:
        """Same-tier copy: gather everything first, so overlapping source and destination ids are safe."""
        pool, dim = (self.device_pool, 1) if tier == Tier.DEVICE else (self.host_blocks, 0)
        src_idx = torch.tensor(src, dtype=torch.long, device=pool.device)
        dst_idx = torch.tensor(dst, dtype=torch.long, device=pool.device)
        pool.index_copy_(dim, dst_idx, pool.index_select(dim, src_idx))

    # -- CUDA: pinned staging buffer, side stream ---------------------------------------------------
    def _side_stream(self) -> torch.cuda.Stream:
        """The copy stream, ordered after the work already queued on the current stream."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._stream

    def _download(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Device -> host: one gather on the device, one transfer, one copy per host block."""
        n = len(src)
        staging = self._stage(n)
        stream = self._side_stream()
        with torch.cuda.stream(stream):
            src_idx = torch.tensor(src, dtype=torch.long).to(self.device, non_blocking=True)
            # [layers, n, ...] -> block-major [n, layers, ...], like the host tier.
            gathered = self.device_pool.index_select(1, src_idx).transpose(0, 1).contiguous()
            staging.copy_(gathered, non_blocking=True)
        stream.synchronize()  # the CPU reads the staging buffer next
        copy_rows(self._host_np, staging.view(torch.uint8).numpy(), dst, range(n), self._bytes_per_block)

    def _upload(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Host -> device: one copy per host block into staging, one transfer, one scatter."""
        n = len(src)
        staging = self._stage(n)
        copy_rows(staging.view(torch.uint8).numpy(), self._host_np, range(n), src, self._bytes_per_block)
        stream = self._side_stream()
        with torch.cuda.stream(stream):
            dst_idx = torch.tensor(dst, dtype=torch.long).to(self.device, non_blocking=True)
            on_device = staging.to(self.device, non_blocking=True)
            self.device_pool.index_copy_(1, dst_idx, on_device.transpose(0, 1))
            event = torch.cuda.Event()
            event.record(stream)
        # Later work on the current stream (the forward) reads these blocks: it waits for the copy.
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._staging_free = event  # the staging buffer may be rewritten once this has passed

    def _stage(self, n: int) -> torch.Tensor:
        """A pinned ``[n, layers, ...]`` staging view, safe to write (the last upload has finished)."""
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
        return self._staging[:numel].view(n, self.num_layers, *self.block_shape)
