"""Verification of draft tokens against the target's logits: one target forward scores the last token
and the k drafts (``k + 1`` logits rows), then

- greedy: the longest prefix of drafts equal to the target's argmax, plus the target's own next token;
- sampling: the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): draft
  ``d_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; the first rejection is replaced by a
  draw from ``normalize(max(p_i - q_i, 0))``; if all are kept a bonus token is drawn from ``p_{k+1}``. The
  tokens produced are then distributed exactly as the target's own samples. A proposer without a
  distribution (prompt lookup) proposes a point mass: ``q_i = onehot(d_i)``.

``p`` and ``q`` are the *processed* distributions (temperature, top-k, top-p), as the sampler uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsched.core.request import SamplingParams
from kvsched.engine.sampler import _filter_top_k_top_p


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[rows, vocab]`` probabilities after the request's temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        logits = _filter_top_k_top_p(logits, [params] * logits.shape[0])
    return torch.softmax(logits, dim=-1)


def verify_greedy(drafts: Sequence[int], target_argmax: Sequence[int]) -> list[int]:
    """Tokens produced: drafts while they equal the target's argmax, then the target's own token."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        t = target_argmax[i]
        out.append(t)
        if d != t:
            return out
    out.append(target_argmax[len(drafts)])
    return out


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=gen).item())


def verify_sampled(
    drafts: Sequence[int],
    p: torch.Tensor,
    q: torch.Tensor | None,
    gen: torch.Generator | None,
) -> list[int]:
    """Tokens produced by the rejection rule; ``p`` is ``[k+1, V]``, ``q`` ``[k, V]`` (None = point masses)."""
    if p.shape[0] != len(drafts) + 1:
        raise ValueError(f"{p.shape[0]} target rows for {len(drafts)} drafts (need drafts + 1)")
    out: list[int] = []
    for i, d in enumerate(drafts):
        pd = float(p[i, d])
        qd = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), generator=gen))
        if u * qd < pd:  # u < p/q, i.e. kept with probability min(1, p/q)
            out.append(d)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        out.append(_draw(residual, gen))
        return out
    out.append(_draw(p[len(drafts)], gen))
    return out
