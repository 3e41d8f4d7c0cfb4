"""Mooncake-format trace replay (JSONL: timestamp ms, input_length, output_length, hash_ids).

Each 512-token hash block `h` becomes the tokens `h * 512 + 0 .. 511`, so two requests sharing a trace
block share every smaller KV block inside it, whatever `tokens_per_block` the cache uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from kvsched.core.errors import ConfigError
from kvsched.sim.workload import TRACE_LIMIT, RequestSpec

MOONCAKE_BLOCK = 512


def _segments(hash_ids: list[int], input_length: int, block: int) -> tuple[tuple[int, int], ...]:
    segs = []
    left = input_length
    for h in hash_ids:
        n = min(block, left)
        segs.append((h * block, n))
        left -= n
    return tuple(segs)


def iter_mooncake(
    path: str | Path, *, start: int = 0, limit: int | None = None, block_size: int = MOONCAKE_BLOCK
) -> Iterator[RequestSpec]:
    """Requests `start .. start + limit` of a trace; arrival times are rebased to the first one read."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"trace file {path} does not exist")
    stop = None if limit is None else start + limit
    t0: float | None = None
    with path.open() as fh:
        for lineno, line in enumerate(islice(fh, start, stop), start=start + 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ts = float(rec["timestamp"]) / 1000.0
                n_in = int(rec["input_length"])
                n_out = int(rec["output_length"])
                ids = [int(h) for h in rec["hash_ids"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{path}:{lineno}: not a Mooncake trace record ({exc!r})") from exc
            if n_in <= 0 or n_out <= 0:
                raise ConfigError(f"{path}:{lineno}: input_length and output_length must be > 0")
            if len(ids) * block_size < n_in or (len(ids) - 1) * block_size >= n_in:
                raise ConfigError(
                    f"{path}:{lineno}: {len(ids)} hash_ids do not cover input_length={n_in} "
                    f"in blocks of {block_size}"
                )
            if min(ids) < 0 or (max(ids) + 1) * block_size > TRACE_LIMIT:
                raise ConfigError(f"{path}:{lineno}: hash_ids out of range")
            if t0 is None:
                t0 = ts
            yield RequestSpec(lineno - 1, ts - t0, _segments(ids, n_in, block_size), n_out)


def load_mooncake(
    path: str | Path, *, start: int = 0, limit: int | None = None, block_size: int = MOONCAKE_BLOCK
) -> list[RequestSpec]:
    """The whole slice as a list, sorted by arrival time."""
    specs = list(iter_mooncake(path, start=start, limit=limit, block_size=block_size))
    specs.sort(key=lambda s: s.arrival_time)
    return specs
