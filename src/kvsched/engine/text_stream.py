"""Per-request incremental detokenization and stop strings.

Decoding only a short window of recent tokens per step keeps detokenization O(1) per token; a delta is
held back while it ends in an incomplete UTF-8 character (U+FFFD). Stop strings are searched only in the
tail that the new text could complete. With stop strings, the last ``len(longest stop) - 1`` characters
are held back until the text is final, so a client never receives text that a stop string later cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_TAIL = 6  # prompt tokens decoded with the first outputs, so a leading space comes out right

Decode = Callable[[Sequence[int]], str]


class TextStream:
    """Turns a growing list of output token ids into text deltas; truncates at a stop string."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_num_prompt", "text", "_stops", "_max_stop", "_sent")

    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int], stop: Sequence[str] | None) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_TAIL:])
        self._num_prompt = len(self._ids)
        self._prefix = 0
        self._read = self._num_prompt
        self.text = ""
        self._sent = 0
        self._stops = [s for s in (stop or ()) if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)

    def push(self, new_ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Add tokens; returns (text delta, hit a stop string). ``final`` flushes held-back bytes."""
        self._ids.extend(new_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        stopped = False
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT)):
            self._prefix, self._read = self._read, len(self._ids)
            stopped = self._append(after[len(before) :])
        end = len(self.text) if final or stopped else len(self.text) - max(0, self._max_stop - 1)
        if end <= self._sent:
            return "", stopped
        delta = self.text[self._sent : end]
        self._sent = end
        return delta, stopped

    def _append(self, delta: str) -> bool:
        """Extend the text; on a stop string cut the text before it and return True."""
        start = len(self.text)
        self.text += delta
        if not self._stops:
            return False
        window_start = max(0, start - self._max_stop + 1)
        window = self.text[window_start:]
        hits = [i for i in (window.find(s) for s in self._stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: window_start + min(hits)]
        return True
