"""ModelRunner: a scheduler step (context chunks + decodes) becomes one forward equal to HF's logits."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from model_testlib import FakeKVStorage

from kvsched.core.config import CacheConfig
from kvsched.core.request import Request, RequestState
from kvsched.engine.model_runner import ModelRunner
from kvsched.engine.weights.loader import load_model

TPB = 4


class FakeManager:
    """Just block tables: request i owns blocks i*10+1 .. i*10+9 (reversed, so not contiguous)."""

    def block_table(self, req):
        return [req.request_id * 10 + 9 - j for j in range(9)]


def test_runner_steps_match_hf(tiny_llama):
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    kv = FakeKVStorage(config.num_layers, 40, TPB, config.num_kv_heads, config.head_dim)
    runner = ModelRunner(model, kv, CacheConfig(tokens_per_block=TPB, num_device_blocks=40))
    manager = FakeManager()
    g = torch.Generator().manual_seed(0)
    a = Request(0, torch.randint(0, 97, (13,), generator=g).tolist(), 8)
    b = Request(1, torch.randint(0, 97, (6,), generator=g).tolist(), 8)
    c = Request(2, torch.randint(0, 97, (9,), generator=g).tolist(), 8)
    for r in (a, b, c):
        r.context_chunk_size = r.prompt_len
    a.context_chunk_size = 7  # a runs in two chunks
    step1 = SimpleNamespace(context_requests=[a, b, c], generation_requests=[])
    rows, logits = runner.run(step1, manager)
    assert rows == [b, c] and logits.shape == (2, 97)
    with torch.no_grad():
        ref_b = hf(torch.tensor([b.prompt_token_ids])).logits[0, -1]
        ref_c = hf(torch.tensor([c.prompt_token_ids])).logits[0, -1]
    torch.testing.assert_close(logits, torch.stack([ref_b, ref_c]), atol=1e-4, rtol=0)
    # step 2: a's last chunk together with decodes of b and c (with a token appended)
    a.context_current_position, a.context_chunk_size = 7, 6
    for r, tok in ((b, 5), (c, 11)):
        r.context_current_position = r.prompt_len
        r.state = RequestState.GENERATION_IN_PROGRESS
        r.output_token_ids.append(tok)
    c.draft_tokens = [3, 4]  # draft verification: 3 logits rows for c
    step2 = SimpleNamespace(context_requests=[a], generation_requests=[b, c])
    rows, logits = runner.run(step2, manager)
    assert rows == [a, b, c, c, c]
    with torch.no_grad():
        ref_a = hf(torch.tensor([a.prompt_token_ids])).logits[0, -1:]
        ref_b = hf(torch.tensor([b.prompt_token_ids + [5]])).logits[0, -1:]
        ref_c = hf(torch.tensor([c.prompt_token_ids + [11, 3, 4]])).logits[0, -3:]
    torch.testing.assert_close(logits, torch.cat([ref_a, ref_b, ref_c]), atol=1e-4, rtol=0)


def test_runner_empty_step(tiny_llama):
    _, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    kv = FakeKVStorage(config.num_layers, 4, TPB, config.num_kv_heads, config.head_dim)
    runner = ModelRunner(model, kv, CacheConfig(tokens_per_block=TPB, num_device_blocks=4))
    rows, logits = runner.run(SimpleNamespace(context_requests=[], generation_requests=[]), FakeManager())
    assert rows == [] and logits.shape == (0, 97)
