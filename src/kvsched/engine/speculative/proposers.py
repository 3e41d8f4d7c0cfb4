"""Draft proposers behind one small interface, and prompt lookup (n-gram matching).

A proposer fills the draft slots that ``reserve_draft_slots`` gave each scheduled generation (it may
propose fewer tokens than slots, never more) and says how likely each draft was under its own
distribution (``q``; None for a point mass). ``settle`` runs after the step update, when the accepted
tokens are known, so a proposer with a KV cache can rewind it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from kvsched.core.request import Request, SamplingParams
from kvsched.core.scheduler.output import SchedulerOutput

#: A request's sampling parameters and its own generator (None: the engine-wide one).
ParamsOf = Callable[[Request], tuple[SamplingParams, torch.Generator | None]]


@dataclass(slots=True)
class Proposal:
    """Draft tokens for one request; ``q[i]`` is the proposer's distribution of ``tokens[i]``."""

    tokens: list[int]
    q: torch.Tensor | None = None


class Proposer(Protocol):
    """What the speculator needs of a proposer (prompt lookup or a draft model)."""

    def propose(self, out: SchedulerOutput, params_of: ParamsOf) -> Mapping[int, Proposal]:
        """Drafts for the scheduled generations (at most ``len(req.draft_tokens)`` each)."""
        ...

    def settle(self, out: SchedulerOutput) -> None:
        """After the step update: keep what the accepted tokens validated, give the rest back."""
        ...


class NgramProposer:
    """Prompt lookup: find the request's last ``n`` tokens earlier in its prompt + output (longest ``n``
    first, most recent match) and propose the tokens that followed them. No model, no KV."""

    __slots__ = ("max_n", "min_n")

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix."""
        size = len(tokens)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            suffix = tokens[size - n :]
            first = suffix[0]
            for start in range(size - n - 1, -1, -1):  # an occurrence ending before the suffix's end
                if tokens[start] == first and tokens[start : start + n] == suffix:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
        return []

    def propose(self, out: SchedulerOutput, params_of: ParamsOf) -> dict[int, Proposal]:
        props = {}
        for req in out.generation_requests:
            k = len(req.draft_tokens)
            if k:
                drafts = self.lookup(req.token_slice(0, req.num_tokens), k)
                if drafts:
                    props[req.request_id] = Proposal(drafts)
        return props

    def settle(self, out: SchedulerOutput) -> None:
        """Nothing to rewind: prompt lookup keeps no state."""
