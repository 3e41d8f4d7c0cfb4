import math

import pytest
import torch

from kvsched.core.request import SamplingParams
from kvsched.engine.sampler import Sampler


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_takes_argmax_and_reports_logprob():
    logits = _logits(4)
    res = Sampler()(logits, [SamplingParams(temperature=0.0)] * 4, want_logprobs=True)
    assert res.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values.tolist()
    assert res.logprobs == pytest.approx(expected, abs=1e-5)


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = _logits(3)
    res = Sampler()(logits, [SamplingParams(temperature=5.0, top_k=1)] * 3)
    assert res.token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_draws_to_the_k_best():
    logits = torch.zeros(200, 20)
    logits[:, 3] = 1.0
    logits[:, 7] = 0.9
    res = Sampler(seed=1)(logits, [SamplingParams(temperature=10.0, top_k=2)] * 200)
    assert set(res.token_ids) == {3, 7}


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(300, 1)
    res = Sampler(seed=2)(logits, [SamplingParams(temperature=1.0, top_p=0.75)] * 300)
    # mass before token 2 is 0.8 >= 0.75, so only tokens 0 and 1 survive
    assert set(res.token_ids) == {0, 1}


def test_unfiltered_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(4000, 1)
    res = Sampler(seed=3)(logits, [SamplingParams(temperature=1.0)] * 4000)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = _logits(3, vocab=1000)
    p = SamplingParams(temperature=1.0, seed=42)

    def draw(batch_logits, row, gen_row):
        gens = [None] * batch_logits.shape[0]
        gens[row] = gen_row
        params = [SamplingParams(temperature=1.0)] * batch_logits.shape[0]
        params[row] = p
        return Sampler(seed=row + 7)(batch_logits, params, gens).token_ids[row]

    g1, g2 = Sampler.make_generator(42), Sampler.make_generator(42)
    alone = [draw(logits[1:2], 0, g1) for _ in range(20)]
    batched = [draw(logits, 1, g2) for _ in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # the generator advances: not the same token every time


def test_mixed_greedy_and_random_rows():
    logits = _logits(4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    res = Sampler()(logits, params, want_logprobs=True)
    greedy = logits.argmax(-1).tolist()
    assert res.token_ids[0] == greedy[0] and res.token_ids[2] == greedy[2]
    assert all(lp <= 0 and math.isfinite(lp) for lp in res.logprobs)


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(_logits(2), [SamplingParams()])


def test_empty_batch():
    assert Sampler()(torch.zeros(0, 5), []).token_ids == []
