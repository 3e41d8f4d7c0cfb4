"""Top-N logprobs: the engine's equal HF transformers' log-softmax of the same weights, position by position."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import make_engine, random_prompts

from kvsched.core.errors import InvalidRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.logprobs import MAX_TOP_LOGPROBS


def _hf_logprobs(hf_ref, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF's log-softmax at each position that predicted an output token: ``[len(output), vocab]``."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf_ref.model(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(output) - 1]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_top_n_equal_hf_log_softmax(tiny_llama_dir, hf_ref, temperature):
    # Mixed N in one batch (None, 0, 1, 5, 20): each request gets its own N; sampled rows (temperature
    # 0.9) report the raw distribution's logprobs, as vLLM does by default.
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=128)
    prompts = random_prompts([3, 9, 17, 30, 5], seed=11)
    nums = [None, 0, 1, 5, MAX_TOP_LOGPROBS]
    ids = [
        ex.add_request(p, SamplingParams(max_tokens=6, temperature=temperature, seed=i, logprobs=n))
        for i, (p, n) in enumerate(zip(prompts, nums))
    ]
    results = {o.request_id: o.outputs[0] for o in ex.run()}
    for rid, prompt, n in zip(ids, prompts, nums):
        out = results[rid]
        if n is None:
            assert out.logprobs is None and out.top_logprobs is None
            continue
        ref = _hf_logprobs(hf_ref, prompt, out.token_ids)
        assert len(out.logprobs) == len(out.top_logprobs) == len(out.token_ids) == 6
        for pos, (tok, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
            assert lp == pytest.approx(ref[pos, tok].item(), abs=1e-4)
            want_lp, want_ids = torch.topk(ref[pos], n) if n else (torch.empty(0), torch.empty(0))
            assert len(top) == n
            assert list(top) == want_ids.tolist(), f"position {pos}: ranking differs from HF"
            assert list(top.values()) == pytest.approx(want_lp.tolist(), abs=1e-4)
        if temperature == 0.0 and n:
            assert all(next(iter(t)) == tok for t, tok in zip(out.top_logprobs, out.token_ids))


def test_step_outputs_carry_top_logprobs_per_token(tiny_llama_dir):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    rid = ex.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))
    other = ex.add_request([4, 5], SamplingParams(max_tokens=4, temperature=0.0))
    streamed = []
    while ex.has_unfinished_requests():
        for o in ex.step():
            if o.request_id == rid:
                assert len(o.top_logprobs) == len(o.new_token_ids) == 1 and len(o.top_logprobs[0]) == 3
                streamed.extend(o.top_logprobs)
            else:
                assert o.request_id == other and o.top_logprobs is None
    assert streamed == ex.pop_output(rid).outputs[0].top_logprobs


@pytest.mark.parametrize("bad", [MAX_TOP_LOGPROBS + 1, -1, True, 2.0])
def test_logprobs_out_of_range_is_refused_before_anything_changes(tiny_llama_dir, bad):
    ex = make_engine(tiny_llama_dir, tokens_per_block=8, num_device_blocks=64)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        ex.add_request([1, 2, 3], SamplingParams(max_tokens=2, logprobs=bad))
    assert not ex.has_unfinished_requests() and ex.kv.stats().num_requests == 0
