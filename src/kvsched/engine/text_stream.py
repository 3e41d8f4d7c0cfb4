"""A request's output text: detokenizing and stop strings, decided once in the engine for every caller.

The engine pushes each request's new tokens into its :class:`TextStream`; the deltas that come back are
what ``LLM`` collects and what the server streams as they are, and a stop-string hit finishes the
request in the engine (vLLM decides stop strings in its detokenizer the same way,
``vllm/v1/engine/detokenizer.py``). Token-level stops (EOS, stop token ids, length) are decided by
``kvsched.core.step.apply_step``, which the simulator shares.

Hold-back: a delta may end in the first characters of a stop string; sending it at once would put text
on the wire that must later be cut. :class:`StopStrings` keeps back the longest tail that begins a stop
(at most ``len(longest stop) - 1`` characters) until the next delta settles it, and searches only the
unsent tail, so each delta costs O(len(delta) + longest stop) however long the output grows.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvsched.engine.tokenizer import IncrementalDetokenizer, TokenDecoder


class StopStrings:
    """Finds the first stop string in text that arrives in pieces, never releasing text it may cut."""

    __slots__ = ("_stops", "_hold", "_pending")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    @property
    def pending(self) -> str:
        """Text received but held back (it may begin a stop string)."""
        return self._pending

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


class TextStream:
    """Turns a request's growing output token ids into text deltas; ends the text at a stop string.

    ``tokenizer=None`` (a model without one) produces no text, so stop strings never match.
    """

    __slots__ = ("_detok", "_stops", "_sent")

    def __init__(
        self, tokenizer: TokenDecoder | None, prompt_token_ids: Sequence[int], stop: Sequence[str] | None
    ) -> None:
        self._detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, prompt_token_ids)
        stops = [s for s in (stop or ()) if s]
        self._stops = StopStrings(stops) if stops else None
        self._sent = ""

    @property
    def text(self) -> str:
        """The output text so far, held-back characters included; cut before a stop string once hit."""
        return self._sent if self._stops is None else self._sent + self._stops.pending

    def push(self, new_ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Add tokens; returns (text delta, hit a stop string). ``final`` flushes everything held back."""
        if self._detok is None:
            return "", False
        delta = self._detok.add(new_ids)
        if final:
            delta += self._detok.flush()
        stopped = False
        if self._stops is not None:
            delta, stopped = self._stops.push(delta)
            if final and not stopped:
                delta += self._stops.flush()
        self._sent += delta
        return delta, stopped
