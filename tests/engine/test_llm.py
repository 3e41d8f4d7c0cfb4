"""`LLM` on the tiny checkpoint (byte tokenizer, tiny chat template): vLLM-shaped results, bad input."""

from __future__ import annotations

import pytest

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
