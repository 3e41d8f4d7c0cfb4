"""`LLM` on the tiny checkpoint (byte tokenizer, tiny chat template): vLLM-shaped results, bad input."""

from __future__ import annotations

import pytest
from engine_testlib import random_prompts

import kvsched
from kvsched.core.errors import ConfigError, InvalidRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.llm import LLM
from kvsched.engine.weights.errors import ModelNotFoundError

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), tokens_per_block=8, num_device_blocks=64, num_host_blocks=32)


def test_public_names():
    assert kvsched.LLM is LLM
    assert kvsched.RequestOutput.__name__ == "RequestOutput"


def test_generate_mixed_prompt_kinds_in_order(llm, hf_ref):
    prompts = ["hello there", {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}, "a much longer prompt " * 4]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello there", None, "a much longer prompt " * 4]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("hello there")
    for o in outs:
        c = o.outputs[0]
        assert c.token_ids == hf_ref.greedy(o.prompt_token_ids, 10)
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert c.finish_reason == "length" and o.finished and o.metrics.ttft is not None


def test_per_prompt_sampling_params(llm):
    params = [SamplingParams(max_tokens=3, temperature=0.0), SamplingParams(max_tokens=6, seed=3)]
    outs = llm.generate(["abc", "def"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 6]
    with pytest.raises(InvalidRequestError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], params, use_tqdm=False)


def test_chat_one_and_many(llm, hf_ref):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    [one] = llm.chat(conv, GREEDY, use_tqdm=False)
    assert one.prompt_token_ids == llm.tokenizer.encode("<system>be brief\n<user>hi\n<assistant>")
    assert one.outputs[0].token_ids == hf_ref.greedy(one.prompt_token_ids, 10)
    many = llm.chat([conv, [{"role": "user", "content": "yo"}]], GREEDY, use_tqdm=False)
    assert many[0].outputs[0].token_ids == one.outputs[0].token_ids and len(many) == 2


def test_bad_prompt_in_a_batch_leaves_nothing_behind(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate(["fine", ""], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate(["fine", {"prompt_token_ids": [1] * 600}], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="expected a string"):
        llm.generate([3.5], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="at least one message"):
        llm.chat([], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.stats().num_requests == 0
    assert [o.outputs[0].text for o in llm.generate(["ok"], GREEDY, use_tqdm=False)]


def test_bad_engine_arguments():
    with pytest.raises(ModelNotFoundError, match="not found"):
        LLM("/no/such/model")
    with pytest.raises(ConfigError, match="unknown engine argument"):
        LLM(None, num_gpus=2)
    with pytest.raises(ConfigError, match="scheduler"):
        LLM(None, scheduler="lottery")


def _pressured_llm(path, priority_mode: bool) -> LLM:
    """Two requests per batch and a device pool that cannot hold two whole requests (7 blocks each),
    so requests queue and running ones get suspended to the host tier."""
    return LLM(
        str(path),
        tokens_per_block=4,
        num_device_blocks=10,
        num_host_blocks=64,
        max_batch_size=2,
        priority_mode=priority_mode,
    )


@pytest.mark.parametrize("priority_mode", [False, True])
def test_late_high_priority_prompt_finishes_first_in_priority_mode(tiny_llama_dir, priority_mode):
    """Six priority-0 prompts, then one priority-5 prompt (the latest arrival). In priority mode it runs
    first and is never the one suspended, so it finishes before every earlier prompt; without priority
    mode the same batch serves it last. The order comes from each result's ``finished_time``."""
    llm = _pressured_llm(tiny_llama_dir, priority_mode)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([12] * 7, seed=1)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[0] * 6 + [5])
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert outs[-1].metrics.arrival_time > max(o.metrics.arrival_time for o in outs[:-1])
    order = sorted(range(7), key=lambda i: outs[i].metrics.finished_time)
    assert order == ([6, 0, 1, 2, 3, 4, 5] if priority_mode else [0, 1, 2, 3, 4, 5, 6])
    assert llm.engine.get_stats().num_paused > 0  # memory pressure did suspend requests
    # Priority changes the order only, never the tokens.
    alone = llm.generate(prompts[-1:], params, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_bad_priorities_are_refused_before_anything_runs(llm):
    with pytest.raises(InvalidRequestError, match="2 priorities for 3 prompts"):
        llm.generate(["a", "b", "c"], GREEDY, use_tqdm=False, priority=[1, 2])
    with pytest.raises(InvalidRequestError, match="priority='high' is invalid"):
        llm.generate(["a"], GREEDY, use_tqdm=False, priority="high")
    with pytest.raises(InvalidRequestError, match="priority=1.5 is invalid"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False, priority=[0, 1.5])
    with pytest.raises(InvalidRequestError, match="priority=True is invalid"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, priority=True)
    assert not llm.engine.has_unfinished_requests()
    [one] = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, priority=-3)
    assert one.finished
