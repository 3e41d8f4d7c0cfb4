"""Speculative decoding in the simulator: how many drafts are accepted, what proposing costs, and the
draft KV cache the scheduler mirrors - the same bookkeeping as the engine's (``kvsched.engine.speculative``).

A step with speculation, as the engine runs it: before the pass every generation gets ``k`` draft slots
(``reserve_draft_slots``: the scheduler counts ``1 + k`` tokens and KV for it); the target verifies
``1 + k`` query tokens per decode in one forward; ``1 + accepted`` tokens are appended; afterwards the
main cache gives back the capacity of the rejected drafts and a draft model's cache keeps only what the
accepted tokens validated. What the simulator cannot compute - which drafts a model would accept - comes
from an :class:`AcceptanceModel`: a per-request rate drawn from a seeded distribution
(:class:`DrawnAcceptance`), or the counts an engine run recorded (:class:`ReplayedAcceptance`, used by
tests/sim/test_engine_sim_identity.py).

Costs: prompt lookup is a host-side match over the request's tokens (taken as free); a draft model runs
``k`` forwards per step (the first also computes what its cache lacks: the context chunks and the last
token of each decode), each charged to the draft's own roofline (``draft_cost``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvsched.core.config import CacheConfig
from kvsched.core.errors import ConfigError
from kvsched.core.kvcache import KVCacheManager
from kvsched.core.scheduler.output import SchedulerOutput
from kvsched.sim.cost import CostModel, StepShape
from kvsched.sim.models import ModelSpec

SPEC_METHODS = ("ngram", "draft")


class AcceptanceModel(Protocol):
    def accepted(self, request_id: int, num_drafts: int) -> int:
        """How many of ``num_drafts`` drafts the target accepts this step (a prefix: 0..num_drafts)."""
        ...

    def forget(self, request_id: int) -> None:
        """The request finished: drop its state."""
        ...


@dataclass(slots=True)
class DrawnAcceptance:
    """Each draft is accepted with the request's own rate while the previous ones were (the first
    rejection ends the step), so accepted drafts follow a truncated geometric law. The rate is drawn once
    per request from a Beta distribution of mean ``rate`` and standard deviation ``spread`` (0: every
    request has ``rate``), from a generator seeded by ``(seed, request id)``: the draws do not depend on
    the order in which requests are scheduled."""

    rate: float
    spread: float = 0.0
    seed: int = 0
    _state: dict[int, tuple[float, np.random.Generator]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_acceptance(self.rate, self.spread)

    def _of(self, rid: int) -> tuple[float, np.random.Generator]:
        st = self._state.get(rid)
        if st is None:
            rng = np.random.default_rng((self.seed, rid))
            rate = self.rate
            if self.spread > 0:
                m = rate
                conc = m * (1 - m) / self.spread**2 - 1  # Beta(a, b) with a + b = conc
                rate = float(rng.beta(m * conc, (1 - m) * conc))
            st = self._state[rid] = (rate, rng)
        return st

    def request_rate(self, request_id: int) -> float:
        return self._of(request_id)[0]

    def accepted(self, request_id: int, num_drafts: int) -> int:
        rate, rng = self._of(request_id)
        n = 0
        while n < num_drafts and rng.random() < rate:
            n += 1
        return n

    def forget(self, request_id: int) -> None:
        self._state.pop(request_id, None)


@dataclass(slots=True)
class ReplayedAcceptance:
    """Accepted counts recorded elsewhere (an engine run), per request in step order."""

    counts: Mapping[int, Sequence[int]]
    _next: dict[int, int] = field(default_factory=dict, repr=False)

    def accepted(self, request_id: int, num_drafts: int) -> int:
        i = self._next.get(request_id, 0)
        seq = self.counts.get(request_id, ())
        if i >= len(seq):
            raise ConfigError(f"request {request_id}: no recorded acceptance for its speculative step {i}")
        self._next[request_id] = i + 1
        if not 0 <= seq[i] <= num_drafts:
            raise ConfigError(f"request {request_id}: {seq[i]} accepted of {num_drafts} drafts at step {i}")
        return seq[i]

    def forget(self, request_id: int) -> None:
        """Replayed counts stay (a test may compare them afterwards)."""


def check_acceptance(rate: float, spread: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"acceptance_rate={rate!r} is invalid: must be in [0, 1]")
    if spread < 0 or (spread > 0 and spread**2 >= rate * (1 - rate)):
        raise ConfigError(
            f"acceptance_spread={spread!r} is invalid: must be 0, or > 0 with spread^2 < rate * (1 - rate)"
            f" = {rate * (1 - rate):.4g} (a Beta distribution of that mean)"
        )


@dataclass(slots=True, frozen=True)
class Speculation:
    """Speculative decoding of a simulated deployment (`kvsched sim --speculative ...`).

    ``draft_model``: the draft's shape (any preset or config with the target's vocabulary); None with
    ``method="draft"`` means the engine's default, a truncated copy of the target: its first
    ``draft_num_layers`` layers (None: a quarter) sharing the target's weights, so it adds only KV.
    """

    method: str
    num_speculative_tokens: int = 3
    acceptance_rate: float = 0.7
    acceptance_spread: float = 0.0
    draft_model: ModelSpec | None = None
    draft_num_layers: int | None = None
    draft_overhead: float = 2e-4  # s per draft forward: launches and sampling, no scheduling
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative={self.method!r} is invalid: one of {', '.join(SPEC_METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"num_speculative_tokens={k!r} is invalid: must be an integer >= 1")
        check_acceptance(self.acceptance_rate, self.acceptance_spread)
        if self.method != "draft" and (self.draft_model is not None or self.draft_num_layers is not None):
            raise ConfigError("a draft model or draft_num_layers needs speculative='draft'")
        if self.draft_model is not None and self.draft_num_layers is not None:
            raise ConfigError("give a draft model or draft_num_layers (a truncated target), not both")
        if self.draft_overhead < 0:
            raise ConfigError(f"draft_overhead={self.draft_overhead!r} is invalid: must be >= 0")

    def draft_spec(self, target: ModelSpec) -> ModelSpec | None:
        """The draft model's shape (None for prompt lookup); a vocabulary mismatch is a ConfigError."""
        if self.method != "draft":
            return None
        if self.draft_model is not None:
            if self.draft_model.vocab_size != target.vocab_size:
                raise ConfigError(
                    f"draft model {self.draft_model.name!r} has a vocabulary of {self.draft_model.vocab_size}"
                    f" tokens, the target {target.vocab_size}: a draft must share the target's vocabulary"
                )
            return self.draft_model
        n = self.draft_num_layers or max(1, target.num_layers // 4)
        if not 1 <= n <= target.num_layers:
            raise ConfigError(f"draft_num_layers={n} is invalid: the target has {target.num_layers} layers")
        return dataclasses.replace(target, name=f"{target.name}[:{n}]", num_layers=n)

    def separate_draft_weights(self) -> bool:
        """A truncated target shares its weights; a separate draft checkpoint needs its own memory."""
        return self.draft_model is not None


@dataclass(slots=True)
class SimSpeculation:
    """What a replica needs to speculate: ``k``, the acceptance model, the draft's cost model and the
    draft cache's config (None for prompt lookup: no draft forward, no draft KV)."""

    k: int
    acceptance: AcceptanceModel
    draft_cost: CostModel | None = None
    draft_cache: CacheConfig | None = None
    draft_block_bytes: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"num_speculative_tokens={self.k!r} is invalid: must be an integer >= 1")


class DraftKV:
    """The draft cache's history, kept as the engine's ``DraftModelProposer`` keeps it, and the shapes
    of the draft forwards of one step (for the cost model)."""

    __slots__ = ("kv", "_valid_end", "first", "rest")

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self._valid_end: dict[int, int] = {}
        self.first = StepShape()  # the first draft forward: what the draft lacks + the first drafts
        self.rest: list[StepShape] = []  # forwards 2..k: one token per request still drafting

    def propose(self, out: SchedulerOutput) -> None:
        """Before the target runs: note what this step can validate; shape the draft forwards."""
        kv, valid = self.kv, self._valid_end
        valid.clear()
        first = self.first
        first.reset()
        self.rest.clear()
        for req in out.context_requests:
            h = kv.history(req)
            end = req.context_current_position + req.context_chunk_size
            valid[req.request_id] = max(h, end)
            if h < end:
                first.add_context(h, end - h, False)
        drafting: list[tuple[int, int]] = []  # (num_tokens, drafts) of the requests that draft
        for req in out.generation_requests:
            h, n = kv.history(req), req.num_tokens
            k = len(req.draft_tokens)
            valid[req.request_id] = n + k - 1 if k else h
            if k:
                first.add_context(h, n - h, True)
                drafting.append((n, k))
        for i in range(1, max((k for _, k in drafting), default=0)):
            s = StepShape()
            for n, k in drafting:
                if k > i:
                    s.add_decode(n - 1 + i, 1)
            self.rest.append(s)

    def cost(self, model: CostModel) -> float:
        if not self.first.num_tokens:
            return 0.0
        return model.step_time(self.first) + sum(model.step_time(s) for s in self.rest)

    def settle(self, out: SchedulerOutput) -> None:
        """After the step update: keep the draft KV the accepted tokens validated, give the rest back."""
        kv = self.kv
        for rs in (out.context_requests, out.generation_requests):
            for req in rs:
                rid = req.request_id
                if not kv.is_request_active(rid):
                    continue
                h = kv.history(req)
                end = min(req.num_tokens - 1, self._valid_end.get(rid, h))
                if end > h:
                    kv.advance(req, end - h)
                kv.revert(req, kv.history(req))
