"""Zero-filled CPU tensors whose memory is committed only where they are written.

``torch.zeros`` on the CPU writes every byte (a memset), so a 1 GiB KV pool costs 1 GiB of resident
memory before the first request, whatever the workload uses. A private anonymous ``mmap`` reads as
zeros too, but the kernel backs a page only when it is first written: an idle pool costs nothing and
a busy one costs the blocks that were ever written (vLLM and SGLang size their CPU KV pools up front
for the same reason; this keeps the size a budget instead of a cost). Pinned host memory (CUDA) and
device memory keep ``torch.zeros``: pinning commits the pages anyway.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["lazy_zeros"]


def lazy_zeros(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    pin_memory: bool = False,
) -> torch.Tensor:
    """Like ``torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)``; on an unpinned
    CPU tensor the pages are committed on first write (a private anonymous mapping)."""
    device = torch.device(device)
    numel = math.prod(shape)
    if device.type != "cpu" or pin_memory or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # MAP_PRIVATE: a forked child gets its own copy-on-write view, never writes the parent's pool.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # frombuffer keeps a reference to ``buf``: the mapping lives as long as the tensor (and its views).
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)
