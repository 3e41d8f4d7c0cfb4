"""Synthetic workloads: Poisson/gamma arrivals, length distributions, system prompts, conversations, LoRA mix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvsched.core.errors import ConfigError
from kvsched.sim.workload import SEGMENT_SPAN, RequestSpec, prefix_base, unique_base


@dataclass(slots=True, frozen=True)
class LengthDist:
    """fixed:N | uniform:LO:HI | lognormal:MEAN:SIGMA (SIGMA of the underlying normal), clipped to [1, max]."""

    kind: str
    a: float
    b: float = 0.0
    max_len: int = SEGMENT_SPAN

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ConfigError(f"length distribution {self.kind!r}: must be fixed, uniform or lognormal")
        if self.a < 1 or (self.kind == "uniform" and self.b < self.a) or self.b < 0:
            raise ConfigError(f"length distribution {self}: invalid parameters")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.split(":")
        try:
            nums = [float(p) for p in parts[1:]]
            return cls(parts[0], *nums)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot parse length distribution {text!r} ({exc})") from exc

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, size=n)
        else:
            sigma = self.b
            mu = math.log(self.a) - sigma * sigma / 2  # so that the mean is `a`
            x = rng.lognormal(mu, sigma, size=n)
        return np.clip(np.rint(x), 1, self.max_len).astype(np.int64)


def arrival_times(
    n: int, rate: float, rng: np.random.Generator, *, process: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """Arrival instants at `rate` req/s (inf = all at 0); gamma with coefficient of variation `cv`."""
    if n < 0:
        raise ConfigError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:
        raise ConfigError(f"rate={rate!r} is invalid: must be > 0 (inf = all at once)")
    if math.isinf(rate):
        return np.zeros(n)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    elif process == "gamma":
        if not cv > 0:
            raise ConfigError(f"cv={cv!r} is invalid: must be > 0")
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    else:
        raise ConfigError(f"arrival process {process!r}: must be poisson or gamma")
    return np.cumsum(gaps) - gaps[0] if n else gaps


def _lora(rng: np.random.Generator, n: int, lora_ids: Sequence[int], lora_fraction: float) -> list:
    if not lora_ids or lora_fraction <= 0:
        return [None] * n
    if not 0 < lora_fraction <= 1:
        raise ConfigError(f"lora_fraction={lora_fraction} must be in (0, 1]")
    use = rng.random(n) < lora_fraction
    pick = rng.integers(0, len(lora_ids), size=n)
    return [int(lora_ids[p]) if u else None for u, p in zip(use, pick)]


def synthetic_workload(
    n: int,
    rate: float,
    prompt_len: LengthDist,
    output_len: LengthDist,
    *,
    seed: int = 0,
    process: str = "poisson",
    cv: float = 1.0,
    shared_prefix_len: int = 0,
    num_shared_prefixes: int = 1,
    lora_ids: Sequence[int] = (),
    lora_fraction: float = 0.0,
    vocab_size: int | None = None,
) -> list[RequestSpec]:
    """Independent requests; with `shared_prefix_len` each prompt starts with one of a few system prompts."""
    if shared_prefix_len < 0 or num_shared_prefixes < 1:
        raise ConfigError("shared_prefix_len must be >= 0 and num_shared_prefixes >= 1")
    rng = np.random.default_rng(seed)
    t = arrival_times(n, rate, rng, process=process, cv=cv)
    p = prompt_len.sample(rng, n)
    o = output_len.sample(rng, n)
    which = rng.integers(0, num_shared_prefixes, size=n)
    loras = _lora(rng, n, lora_ids, lora_fraction)
    specs = []
    for i in range(n):
        segs: list[tuple[int, int]] = []
        if shared_prefix_len:
            segs.append((prefix_base(int(which[i])), shared_prefix_len))
        segs.append((unique_base(i), int(p[i])))
        specs.append(RequestSpec(i, float(t[i]), tuple(segs), int(o[i]), loras[i], None, vocab_size))
    return specs


def long_prompt_workload(
    n: int = 4000,
    duration_s: float = 1000.0,
    *,
    prefix_len: int = 12_000,
    num_prefixes: int = 16,
    question_len: float = 3_000,
    output_len: float = 150,
    seed: int = 0,
) -> list[RequestSpec]:
    """Long prompts over shared documents (RAG / long-context chat): each prompt is one of
    ``num_prefixes`` shared ``prefix_len``-token documents plus its own question (lognormal, mean
    ``question_len``), so the mean prompt is ``prefix_len + question_len`` (15k by default); outputs
    are lognormal with mean ``output_len``; Poisson arrivals over about ``duration_s`` seconds.

    The simulator's heavy case: every step is long prefills and many KV blocks to hash and move, and the
    prefix cache decides how much of each prompt is computed at all."""
    if n < 1 or not duration_s > 0:
        raise ConfigError(f"long_prompt_workload needs n >= 1 and duration_s > 0, got {n}, {duration_s}")
    return synthetic_workload(
        n,
        n / duration_s,
        LengthDist("lognormal", question_len, 0.6),
        LengthDist("lognormal", output_len, 0.5),
        seed=seed,
        shared_prefix_len=prefix_len,
        num_shared_prefixes=num_prefixes,
    )


def multi_turn_workload(
    num_conversations: int,
    turns: int,
    rate: float,
    user_len: LengthDist,
    output_len: LengthDist,
    *,
    think_time: float = 5.0,
    system_prompt_len: int = 0,
    seed: int = 0,
    vocab_size: int | None = None,
) -> list[RequestSpec]:
    """Conversations: turn k's prompt is turn k-1's prompt + its answer + a new user message.

    Turn k arrives `think_time` s after turn k-1 finished (closed loop, resolved by the simulator), so the
    earlier turns' KV can be reused from the prefix cache if it survived.
    """
    if turns < 1 or think_time < 0:
        raise ConfigError("turns must be >= 1 and think_time >= 0")
    rng = np.random.default_rng(seed)
    starts = arrival_times(num_conversations, rate, rng)
    specs: list[RequestSpec] = []
    for c in range(num_conversations):
        segs: tuple[tuple[int, int], ...] = (
            ((prefix_base(0), system_prompt_len),) if system_prompt_len else ()
        )
        prev: RequestSpec | None = None
        u = user_len.sample(rng, turns)
        o = output_len.sample(rng, turns)
        for k in range(turns):
            rid = len(specs)
            if prev is not None:
                segs = segs + ((prev.output_base, prev.output_len),)
            segs = segs + ((unique_base(rid), int(u[k])),)
            arrival = float(starts[c]) if prev is None else think_time
            spec = RequestSpec(
                rid, arrival, segs, int(o[k]), None, None if prev is None else prev.request_id, vocab_size
            )
            specs.append(spec)
            prev = spec
    return specs
