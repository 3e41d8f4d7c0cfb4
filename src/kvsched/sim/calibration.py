"""Measured engine costs that calibrate `LinearCostModel`: per-row forward time, block copies.

Why a GEMM profile: a CPU BLAS picks its kernel by the number of rows M of ``x @ W.T``, so a decode
step is not linear in its batch size where batches are small (a device pool that holds ~3 requests).
Measured on SmolLM2-135M, one thread: with MKL's sgemm the model's linears took ~38, 57, 65, 50 ms at
M = 1..4 (batch 3 slower than batch 4); with oneDNN-prepacked weights (engine/model/packed.py) whole
decode steps take ~55, 67, 54, 53 ms (batch 2 the slow one). A line fitted to the calibration steps
misses every such step. `GemmProfile` holds the engine's own forward timed at each M
(``kvsched.engine.gemm_timing``), and `LinearCostModel` uses its seconds as one more regressor, so the
fit keeps the kernel's shape instead of averaging it away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvsched.core.errors import ConfigError


@dataclass(slots=True)
class GemmProfile:
    """Seconds of a model's per-row work for M rows: ``body`` = the decoder (its linears dominate; M =
    the step's tokens), ``head`` = the LM head (M = the step's logits), measured at ``rows`` (increasing,
    >= 1).
    Between measured rows the time is interpolated linearly; past the last one it grows with the slope
    of the last two (large M is compute-bound, linear in M); 0 rows cost 0."""

    rows: tuple[int, ...]
    body: tuple[float, ...]
    head: tuple[float, ...]
    _tables: tuple[list[float], list[float]] = field(init=False, repr=False, compare=False)
    _slopes: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = self.rows
        if not rows or len(self.body) != len(rows) or len(self.head) != len(rows):
            raise ConfigError(
                f"GemmProfile needs one body and one head time per row count: {len(rows)} rows, "
                f"{len(self.body)} body, {len(self.head)} head"
            )
        if any(not isinstance(m, int) or m < 1 for m in rows) or any(b <= a for a, b in zip(rows, rows[1:])):
            raise ConfigError(f"GemmProfile rows must be increasing integers >= 1, got {rows}")
        if any(not t >= 0 for t in (*self.body, *self.head)):
            raise ConfigError("GemmProfile times must be >= 0 seconds")
        dense = np.arange(rows[-1] + 1)
        tables, slopes = [], []
        for times in (self.body, self.head):
            tab = np.interp(dense, rows, times)
            tab[0] = 0.0
            tables.append([float(t) for t in tab])  # a list: one index per simulated step
            if len(rows) > 1:
                slopes.append(max(0.0, (times[-1] - times[-2]) / (rows[-1] - rows[-2])))
            else:
                slopes.append(times[0] / rows[0])
        self._tables = (tables[0], tables[1])
        self._slopes = (slopes[0], slopes[1])

    def seconds(self, num_tokens: int, num_logits: int) -> float:
        """Dense-layer seconds of a step that runs ``num_tokens`` rows and ``num_logits`` LM-head rows."""
        body, head = self._tables
        last = len(body) - 1
        b = body[num_tokens] if num_tokens <= last else body[last] + (num_tokens - last) * self._slopes[0]
        h = head[num_logits] if num_logits <= last else head[last] + (num_logits - last) * self._slopes[1]
        return b + h


def nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``x @ c ~ y`` on relative error (each row weighted by 1/y, so short
    steps count as much as long ones); a small active set: the most negative coefficient is dropped and
    the rest refitted until all are >= 0. Columns are scaled first (features span 1 to 1e6)."""
    w = 1.0 / np.maximum(y, 1e-9)
    x, y = x * w[:, None], y * w
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
        sol = sol / scale[active]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def fit_copy_cost(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """(seconds per call, bytes per second) of ``t = overhead + bytes / bandwidth`` fitted to timed
    block-copy calls, least squares on relative error; a negative overhead is clamped to 0 and the
    bandwidth refitted through the origin."""
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ConfigError("fit_copy_cost needs >= 2 (bytes, seconds) pairs of equal count")
    b = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if (b <= 0).any() or (t <= 0).any():
        raise ConfigError("fit_copy_cost: every call must move > 0 bytes in > 0 seconds")
    w = 1.0 / t
    x = np.stack([np.ones_like(b), b], axis=1) * w[:, None]
    (overhead, per_byte), *_ = np.linalg.lstsq(x, t * w, rcond=None)
    if overhead < 0 or per_byte <= 0:
        overhead = 0.0
        per_byte = float(np.sum(b * w * w * t) / np.sum((b * w) ** 2))
    return float(overhead), float(1.0 / per_byte)
