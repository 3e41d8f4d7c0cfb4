"""Whole-block copies between numpy byte views of KV pools, split over a few threads when large.

A block of a fragmented pool is its own memory region, so a batch of scattered blocks is one copy
per block. numpy copies them with plain memcpy loops and releases the GIL while it does, so a big
batch is cut in contiguous parts copied by several threads at once (one core alone does not reach
the memory bandwidth). Threads wait on futures, not on spinning OpenMP barriers, so a machine
loaded by other processes slows the copy down gracefully instead of stalling every block.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Below this a hand-off to another thread (tens of microseconds) costs more than it saves.
PARALLEL_BYTES = 8 << 20
MAX_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="kv-copy")
        return _pool


def _rows(dst: np.ndarray, src: np.ndarray, dst_ids: Sequence[int], src_ids: Sequence[int]) -> None:
    for d, s in zip(dst_ids, src_ids):
        dst[d] = src[s]


def copy_rows(
    dst: np.ndarray, src: np.ndarray, dst_ids: Sequence[int], src_ids: Sequence[int], row_bytes: int
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for every ``i``, in order; ``row_bytes`` is one row's size.

    Rows are blocks (``[layers, ...]`` views, contiguous or strided). Parts run concurrently only
    when every destination is distinct, so the result is always the one of the sequential loop.
    """
    n = len(dst_ids)
    parts = 1
    if n > 1 and n * row_bytes >= PARALLEL_BYTES:
        parts = min(MAX_THREADS, torch.get_num_threads(), n)
        if parts > 1 and len(set(dst_ids)) != n:
            parts = 1
    if parts == 1:
        _rows(dst, src, dst_ids, src_ids)
        return
    step = -(-n // parts)
    pool = _executor()
    futures = [
        pool.submit(_rows, dst, src, dst_ids[i : i + step], src_ids[i : i + step])
        for i in range(step, n, step)
    ]
    try:
        _rows(dst, src, dst_ids[:step], src_ids[:step])
    finally:
        for f in futures:
            f.result()
