"""Memory pressure without room on the host tier: the unified scheduler preempts for recompute
instead of failing, and every request still gets exactly the tokens it gets with an ample host tier."""

from __future__ import annotations

import pytest
from engine_testlib import random_prompts

from kvsched.core.request import SamplingParams
from kvsched.engine.llm import LLM

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def generate(path, host_blocks: int, prompts):
    llm = LLM(
        str(path), tokens_per_block=8, num_device_blocks=24, num_host_blocks=host_blocks, max_batch_size=12
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([44, 46, 45, 43, 47, 45, 44, 46, 45, 42, 48, 45], seed=3)


@pytest.fixture(scope="module")
def ample(tiny_llama_dir, prompts):
    tokens, outs = generate(tiny_llama_dir, 400, prompts)
    assert sum(o.metrics.num_suspends for o in outs) > 0  # the pressure is real
    return tokens


@pytest.mark.parametrize("host_blocks", [0, 1])
def test_no_or_tiny_host_tier_finishes_every_request_with_the_same_tokens(
    tiny_llama_dir, prompts, ample, host_blocks
):
    tokens, outs = generate(tiny_llama_dir, host_blocks, prompts)
    assert tokens == ample
    assert all(len(t) == 40 for t in tokens)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
