"""Stop strings applied by the server, with hold-back, so streamed deltas never leak a stop's prefix.

A delta may end in the first characters of a stop string; sending it at once would put text on the
wire that must later be cut. We keep back the longest tail that begins a stop (at most
``len(longest stop) - 1`` characters) until the next delta settles it, and search only the unsent tail, so each delta costs O(len(delta)
+ longest stop) however long the output grows.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopBuffer:
    __slots__ = ("_stops", "_hold", "_pending")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to send, a stop was hit). After a hit the text excludes the stop."""
        pending = self._pending + delta
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        keep = self._partial(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def _partial(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        out, self._pending = self._pending, ""
        return out
