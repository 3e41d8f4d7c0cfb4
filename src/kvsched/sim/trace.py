"""Mooncake-format trace replay (JSONL: timestamp ms, input_length, output_length, hash_ids).

Each 512-token hash block `h` becomes the tokens `h * 512 + 0 .. 511`, so two requests sharing a trace
block share every smaller KV block inside it, whatever `tokens_per_block` the cache uses.

The Mooncake conversation trace ships with the package (`sim/data/`, gzip; source and licence in its
README); `path=None` replays it, so the simulator needs no file from outside the install.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING

from kvsched.core.errors import ConfigError
from kvsched.sim.workload import TRACE_LIMIT, RequestSpec

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MOONCAKE_BLOCK = 512
DEFAULT_TRACE_NAME = "mooncake_conversation_trace.jsonl.gz"
_GZIP_MAGIC = b"\x1f\x8b"


def default_trace() -> Traversable:
    """The shipped Mooncake conversation trace (12,031 requests), as a package resource.

    A resource rather than a path: it may live inside a zip or wheel; open it with `.open("rb")`
    (gzip bytes) or hand `None` to `iter_mooncake` / `load_mooncake`.
    """
    return resources.files("kvsched.sim") / "data" / DEFAULT_TRACE_NAME


@contextmanager
def _open_text(path: str | Path | None) -> Iterator[tuple[str, IO[str]]]:
    """(label for errors, text stream) of a trace; gzip is detected by its magic bytes, not the name."""
    if path is None:
        label, raw = f"<shipped {DEFAULT_TRACE_NAME}>", default_trace().open("rb")
    else:
        fpath = Path(path)
        if not fpath.is_file():
            raise ConfigError(f"trace file {fpath} does not exist")
        label, raw = str(fpath), fpath.open("rb")
    with raw:
        head = raw.read(2)
        raw.seek(0)
        binary = gzip.GzipFile(fileobj=raw, mode="rb") if head == _GZIP_MAGIC else raw
        with io.TextIOWrapper(binary, encoding="utf-8") as fh:
            yield label, fh


def _segments(hash_ids: list[int], input_length: int, block: int) -> tuple[tuple[int, int], ...]:
    segs = []
    left = input_length
    for h in hash_ids:
        n = min(block, left)
        segs.append((h * block, n))
        left -= n
    return tuple(segs)


def iter_mooncake(
    path: str | Path | None = None,
    *,
    start: int = 0,
    limit: int | None = None,
    block_size: int = MOONCAKE_BLOCK,
) -> Iterator[RequestSpec]:
    """Requests `start .. start + limit` of a trace (`None`: the shipped one; `.jsonl` or gzip-compressed);
    arrival times are rebased to the first one read."""
    if start < 0 or (limit is not None and limit < 0):
        raise ConfigError(f"trace slice start={start}, limit={limit} must not be negative")
    stop = None if limit is None else start + limit
    t0: float | None = None
    with _open_text(path) as (label, fh):
        for lineno, line in enumerate(_lines(fh, label, start, stop), start=start + 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ts = float(rec["timestamp"]) / 1000.0
                n_in = int(rec["input_length"])
                n_out = int(rec["output_length"])
                ids = [int(h) for h in rec["hash_ids"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{label}:{lineno}: not a Mooncake trace record ({exc!r})") from exc
            if n_in <= 0 or n_out <= 0:
                raise ConfigError(f"{label}:{lineno}: input_length and output_length must be > 0")
            if len(ids) * block_size < n_in or (len(ids) - 1) * block_size >= n_in:
                raise ConfigError(
                    f"{label}:{lineno}: {len(ids)} hash_ids do not cover input_length={n_in} "
                    f"in blocks of {block_size}"
                )
            if min(ids) < 0 or (max(ids) + 1) * block_size > TRACE_LIMIT:
                raise ConfigError(f"{label}:{lineno}: hash_ids out of range")
            if t0 is None:
                t0 = ts
            yield RequestSpec(lineno - 1, ts - t0, _segments(ids, n_in, block_size), n_out)


def _lines(fh: IO[str], label: str, start: int, stop: int | None) -> Iterator[str]:
    """The lines `start .. stop`; a corrupt gzip stream or bad text is a ConfigError naming the file."""
    try:
        yield from islice(fh, start, stop)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read the trace ({exc})") from exc


def load_mooncake(
    path: str | Path | None = None,
    *,
    start: int = 0,
    limit: int | None = None,
    block_size: int = MOONCAKE_BLOCK,
) -> list[RequestSpec]:
    """The whole slice as a list, sorted by arrival time (`path=None`: the shipped trace)."""
    specs = list(iter_mooncake(path, start=start, limit=limit, block_size=block_size))
    specs.sort(key=lambda s: s.arrival_time)
    return specs
