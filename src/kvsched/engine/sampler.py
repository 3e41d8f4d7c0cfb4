"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds.

One batched pass over the rows that need logits. Greedy rows take an argmax; random rows are filtered
(top-k, top-p) on one shared sort and drawn with the exponential-race trick (``argmax(p / E)`` with
``E ~ Exp(1)``), which lets a seeded request draw its noise from its own ``torch.Generator`` so its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.core.request import SamplingParams
from kvsched.engine.logprobs import row_logprobs


@dataclass(slots=True)
class SampleResult:
    """Chosen token per row, its log-probability under the model's raw distribution, and the row's top
    ``params.logprobs`` tokens ``{token: logprob}`` (engine/logprobs.py)."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None = None


class Sampler:
    """Chooses one token per logits row. Stateless apart from the engine-wide generator."""

    __slots__ = ("generator",)

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @staticmethod
    def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A per-request generator: a seeded request draws only from this one."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        want_logprobs: bool = False,
    ) -> SampleResult:
        """``logits`` is ``[len(params), vocab]``; ``generators[i]`` (optional) seeds row ``i``."""
        n = logits.shape[0]
        if n != len(params):
            raise ValueError(f"{n} logits rows for {len(params)} sampling params")
        if n == 0:
            return SampleResult([], [] if want_logprobs else None, [] if want_logprobs else None)
        logits = logits.float()
        chosen = torch.argmax(logits, dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            picked = self._sample_random(
                logits.index_select(0, rows),
                [params[i] for i in random_rows],
                [generators[i] if generators else None for i in random_rows],
            )
            chosen.index_copy_(0, rows, picked)
        if not want_logprobs:
            return SampleResult(chosen.tolist(), None)
        lps = row_logprobs(logits, chosen, [p.logprobs or 0 for p in params])
        return SampleResult(chosen.tolist(), lps.sampled, lps.top)

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _filter_top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            if len(shared) == len(generators):
                noise.exponential_(generator=self.generator)
            else:
                for i in shared:
                    noise[i].exponential_(generator=self.generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        return torch.argmax(probs / noise, dim=-1)


def _filter_top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p nucleus; one sort for both."""
    vocab = logits.shape[1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
    drop = ranks >= k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token when the mass strictly before it is below top_p: the first token always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
