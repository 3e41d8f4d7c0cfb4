"""The rejection-sampling rule keeps the target's distribution (a 4-token vocabulary, many draws), and
the same check catches a wrong rule; greedy verification keeps the longest matching prefix."""

from __future__ import annotations

import pytest
import torch

from kvsched.core.request import SamplingParams
from kvsched.engine.speculative.verify import processed_probs, verify_greedy, verify_sampled

P = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
Q = torch.tensor([[0.1, 0.1, 0.2, 0.6], [0.4, 0.1, 0.4, 0.1]])
N = 12_000
TV_BOUND = 0.03  # the noise of N draws over 4 tokens is ~0.01; the wrong rules below are >= 0.1 off


def _wrong_resample_from_p(drafts, p, q, gen):
    """A common mistake: on rejection, draw from p instead of normalize(max(p - q, 0))."""
    out = []
    for i, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[i, d])
        if float(torch.rand((), generator=gen)) * qd < float(p[i, d]):
            out.append(d)
            continue
        out.append(int(torch.multinomial(p[i], 1, generator=gen)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=gen)))
    return out


def _wrong_always_accept(drafts, p, q, gen):
    return [*drafts, int(torch.multinomial(p[len(drafts)], 1, generator=gen))]


def _frequencies(rule, use_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token frequencies at positions 0 and 1 over N speculative steps with drafts from Q (or, with
    ``use_q=False``, a point-mass proposer that always proposes tokens 3, 0)."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(N):
        if use_q:
            drafts = [int(torch.multinomial(Q[i], 1, generator=gen)) for i in range(2)]
            toks = rule(drafts, P, Q, gen)
        else:
            toks = rule([3, 0], P, None, gen)
        first[toks[0]] += 1
        if len(toks) > 1:  # the rows of P do not depend on the prefix, so position 1 must follow P[1]
            second[toks[1]] += 1
    return first / first.sum(), second / second.sum()


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.parametrize("use_q", [True, False], ids=["draft-distribution", "point-mass"])
def test_rejection_sampling_keeps_the_target_distribution(use_q):
    first, second = _frequencies(verify_sampled, use_q)
    assert _tv(first, P[0]) < TV_BOUND
    assert _tv(second, P[1]) < TV_BOUND


@pytest.mark.parametrize("rule", [_wrong_resample_from_p, _wrong_always_accept])
def test_the_check_catches_a_wrong_acceptance_rule(rule):
    first, _ = _frequencies(rule, True)
    assert _tv(first, P[0]) > 3 * TV_BOUND


def test_verify_sampled_needs_one_target_row_more_than_drafts():
    with pytest.raises(ValueError, match="drafts"):
        verify_sampled([1, 2], P[:2], None, None)


def test_greedy_keeps_the_longest_matching_prefix_and_the_targets_next_token():
    assert verify_greedy([5, 6, 7], [5, 6, 9, 4]) == [5, 6, 9]
    assert verify_greedy([5, 6, 7], [5, 6, 7, 4]) == [5, 6, 7, 4]
    assert verify_greedy([5], [3, 8]) == [3]
    assert verify_greedy([], [2]) == [2]


def test_processed_probs_apply_temperature_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[0, 2] == 0 and p[0, 3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    hot = processed_probs(logits, SamplingParams(temperature=10.0))
    assert float(hot[0].max() - hot[0].min()) < float(processed_probs(logits, SamplingParams())[0].max())
