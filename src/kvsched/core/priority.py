"""Request priorities for workload generators: a weighted mix of priority classes.

Convention (the whole project): ``Request.priority`` is an integer and **higher = more important**;
a scheduler in priority mode serves higher priorities first and suspends the lowest first, and the
KV manager evicts cached blocks of lower priority first. (vLLM's ``priority`` is the other way round:
lower values are served earlier.) The load generator (``kvsched bench serve --priority-mix``) and the
simulator (``kvsched sim --priority-mix``) draw each request's priority from a :class:`PriorityMix`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kvsched.core.errors import ConfigError


@dataclass(slots=True, frozen=True)
class PriorityMix:
    """Priority classes and their weights, e.g. ``PriorityMix.parse("0:0.8,10:0.2")``."""

    classes: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise ConfigError("a priority mix needs at least one PRIORITY:WEIGHT class")
        seen = set()
        for prio, weight in self.classes:
            if not isinstance(prio, int) or isinstance(prio, bool):
                raise ConfigError(f"priority {prio!r} in a priority mix is invalid: must be an integer")
            if prio in seen:
                raise ConfigError(f"priority {prio} appears twice in the priority mix")
            seen.add(prio)
            if not (weight > 0 and math.isfinite(weight)):
                raise ConfigError(f"weight {weight!r} of priority {prio} is invalid: must be > 0")

    @classmethod
    def parse(cls, text: str) -> PriorityMix:
        """``"P:W,P:W,..."`` (weights need not sum to 1); a bare ``"P"`` means weight 1."""
        classes = []
        for item in text.split(","):
            if not item.strip():
                continue
            prio_text, _, weight_text = item.partition(":")
            try:
                classes.append((int(prio_text), float(weight_text) if weight_text.strip() else 1.0))
            except ValueError:
                raise ConfigError(
                    f"priority mix item {item.strip()!r} is invalid: use PRIORITY:WEIGHT, e.g. 0:0.8,10:0.2"
                ) from None
        return cls(tuple(classes))

    def sample(self, n: int, seed: int = 0) -> list[int]:
        """``n`` priorities drawn independently with the class weights (deterministic per seed)."""
        if n < 0:
            raise ConfigError(f"number of requests must be >= 0, got {n}")
        prios = [p for p, _ in self.classes]
        if len(prios) == 1:
            return prios * n
        return random.Random(seed).choices(prios, weights=[w for _, w in self.classes], k=n)
