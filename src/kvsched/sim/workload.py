"""Workload descriptions: what arrives when, with which tokens, wanting how many outputs.

A prompt is a tuple of token *segments* `(base, length)`; equal segments give equal tokens, so prefix
sharing (trace hash blocks, system prompts, earlier turns of a conversation) is exact and the token lists
are built only when a request arrives. A segment's tokens are a *tag* (`base + 256`, distinct for every
base and from every other token) followed by `i & 255` at offset `i`: the KV manager's block keys are
chained, so the tag alone makes every block from there on distinct from any other segment's, and the rest
are Python's cached small ints, which a prompt of 10k+ tokens copies instead of allocating (a trace of
145M prompt tokens builds 4x faster). A request's outputs follow the same rule (`output_token`), so a
conversation's next turn, whose prompt holds the answer as a segment, reuses the answer's KV.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from kvsched.core.errors import ConfigError
from kvsched.core.priority import PriorityMix

# Token ids must fit the KV manager's int32 block keys, so the sources get disjoint ranges below 2**31:
# trace blocks h * 512 (h < 2**20), shared prefixes, unique prompt text, outputs. Keys are chained, so two
# requests only share a block if everything before it matches: a segment's base only has to differ from
# the other segments that can follow the same prefix.
TRACE_LIMIT = 1 << 29
PREFIX_BASE = 1 << 29
UNIQUE_BASE = 1 << 30
OUTPUT_BASE = (1 << 30) + (1 << 29)
SEGMENT_SPAN = 1 << 17  # the most tokens one segment may hold
_STRIDE = 4099  # odd: ``rid * _STRIDE`` differs modulo a power of two for every rid below it
#: token at offset i >= 1 of any segment (small ints are shared objects: copying them allocates nothing)
SMALL_TOKENS: list[int] = [i & 255 for i in range(SEGMENT_SPAN + 1)]


def segment_tag(base: int) -> int:
    """The first token of a segment: above every ``SMALL_TOKENS`` value, one per base (below 2**31)."""
    return base + 256


def unique_base(request_id: int) -> int:
    return UNIQUE_BASE + (request_id * _STRIDE) % (1 << 29)


def output_base(request_id: int) -> int:
    return OUTPUT_BASE + (request_id * _STRIDE) % (1 << 28)


def prefix_base(index: int) -> int:
    if not 0 <= index < (1 << 29) // SEGMENT_SPAN:
        raise ConfigError(f"shared prefix index {index} out of range")
    return PREFIX_BASE + index * SEGMENT_SPAN


def mix_token(x: int, vocab_size: int) -> int:
    """Map a synthetic token id into [0, vocab) with a multiplicative hash (for engines with a real vocab)."""
    return ((x * 0x9E3779B97F4A7C15) >> 11) % vocab_size


@dataclass(slots=True)
class RequestSpec:
    """One request of a workload.

    `arrival_time` is absolute (seconds) unless `parent` is set: then it is the think time after the
    parent request finishes (a closed-loop conversation turn). `priority`: higher = more important
    (see kvsched.core.priority); it orders scheduling when the simulator runs in priority mode.
    """

    request_id: int
    arrival_time: float
    segments: tuple[tuple[int, int], ...]
    output_len: int
    lora_id: int | None = None
    parent: int | None = None
    vocab_size: int | None = None
    priority: int = 0
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = sum(n for _, n in self.segments)
        if any(n > SEGMENT_SPAN for _, n in self.segments):
            raise ConfigError(f"request {self.request_id}: a prompt segment exceeds {SEGMENT_SPAN} tokens")
        if self.prompt_len <= 0:
            raise ConfigError(f"request {self.request_id}: the prompt is empty")
        if not 1 <= self.output_len <= SEGMENT_SPAN:
            raise ConfigError(
                f"request {self.request_id}: output_len must be in [1, {SEGMENT_SPAN}], got {self.output_len}"
            )
        if self.arrival_time < 0 or not math.isfinite(self.arrival_time):
            raise ConfigError(f"request {self.request_id}: arrival_time={self.arrival_time} is invalid")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ConfigError(f"request {self.request_id}: priority={self.priority!r} must be an integer")

    def prompt_tokens(self) -> list[int]:
        toks: list[int] = []
        append, extend, run = toks.append, toks.extend, _small_run
        for b, n in self.segments:
            if n:  # an empty segment (a trace's hash id past its input length) has no tag either
                append(b + 256)  # segment_tag(b), inlined: this runs once per 512 tokens of a trace
                extend(run(n))
        if self.vocab_size is not None:
            v = self.vocab_size
            return [mix_token(t, v) for t in toks]
        return toks

    @property
    def output_base(self) -> int:
        return output_base(self.request_id)

    def output_token(self, index: int) -> int:
        """The token the simulated model emits at output position `index` (deterministic): the
        segment rule over ``(output_base, output_len)``."""
        t = segment_tag(self.output_base) if index == 0 else SMALL_TOKENS[index]
        return t if self.vocab_size is None else mix_token(t, self.vocab_size)

    @property
    def total_tokens(self) -> int:
        return self.prompt_len + self.output_len


@functools.lru_cache(maxsize=256)
def _small_run(n: int) -> list[int]:
    """``SMALL_TOKENS[1:n]``, the tokens after a segment's tag, shared per length (a trace's 512-token
    blocks all use one: extending from it copies once instead of slicing first). Never mutated."""
    return SMALL_TOKENS[1:n]


def time_scaled(specs: Iterable[RequestSpec], time_scale: float) -> list[RequestSpec]:
    """Multiply arrival times (and think times) by `time_scale`: 0.5 replays twice as fast."""
    if not time_scale > 0 or not math.isfinite(time_scale):
        raise ConfigError(f"time_scale={time_scale!r} is invalid: must be > 0")
    return [replace(s, arrival_time=s.arrival_time * time_scale) for s in specs]


def with_priorities(specs: Sequence[RequestSpec], mix: PriorityMix, seed: int = 0) -> list[RequestSpec]:
    """Give each request a priority drawn from ``mix``; a conversation turn keeps its first turn's."""
    drawn = mix.sample(len(specs), seed)
    given: dict[int, int] = {}
    out = []
    for spec, prio in zip(specs, drawn):
        if spec.parent is not None:
            prio = given.get(spec.parent, prio)
        given[spec.request_id] = prio
        out.append(replace(spec, priority=prio))
    return out


def workload_summary(specs: Sequence[RequestSpec]) -> dict[str, float]:
    """Size of a workload: counts, mean lengths and the arrival span."""
    n = len(specs)
    if n == 0:
        return {"requests": 0}
    roots = [s.arrival_time for s in specs if s.parent is None]
    return {
        "requests": n,
        "mean_prompt_len": sum(s.prompt_len for s in specs) / n,
        "mean_output_len": sum(s.output_len for s in specs) / n,
        "arrival_span_s": (max(roots) - min(roots)) if roots else 0.0,
    }
