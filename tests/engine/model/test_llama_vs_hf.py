"""Our paged-attention decoder against HF transformers on the same tiny random weights (1e-4)."""

from __future__ import annotations

import pytest
import torch
from model_testlib import FakeKVStorage, save_tiny

from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.weights.loader import load_model

TPB = 4
ATOL = 1e-4


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def make_storage(config, num_blocks: int = 64) -> FakeKVStorage:
    return FakeKVStorage(config.num_layers, num_blocks, TPB, config.num_kv_heads, config.head_dim)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (n,), generator=g).tolist()


def test_single_prefill_all_positions(tiny_llama):
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    toks = prompt(19, 1)
    kv = make_storage(config)
    table = [7, 3, 11, 2, 9]
    out = model(ForwardBatch.build([SeqInput(toks, 0, table, len(toks))], TPB), kv)
    torch.testing.assert_close(out, hf_logits(hf, toks), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode(tiny_llama):
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    toks = prompt(30, 2)
    ref = hf_logits(hf, toks)
    kv = make_storage(config)
    table = [13, 4, 40, 1, 22, 8, 30, 17]  # not contiguous, not sorted
    pos = 0
    for chunk in (5, 7, 4, 6):  # chunks that start and end mid-block
        out = model(ForwardBatch.build([SeqInput(toks[pos : pos + chunk], pos, table, chunk)], TPB), kv)
        torch.testing.assert_close(out, ref[pos : pos + chunk], atol=ATOL, rtol=0)
        pos += chunk
    for _ in range(30 - pos):  # decode one token at a time
        out = model(ForwardBatch.build([SeqInput(toks[pos : pos + 1], pos, table, 1)], TPB), kv)
        torch.testing.assert_close(out, ref[pos : pos + 1], atol=ATOL, rtol=0)
        pos += 1


def run_mixed_batch(hf, model, config) -> None:
    """Several sequences, mixed prefill chunks / decodes / draft verification in the same forwards."""
    kv = make_storage(config, num_blocks=80)
    lengths = [23, 9, 2, 31, 14, 17]
    seqs = [prompt(n, 10 + i) for i, n in enumerate(lengths)]
    refs = [hf_logits(hf, s) for s in seqs]
    perm = torch.randperm(79, generator=torch.Generator().manual_seed(5)) + 1  # block 0 left as padding
    tables, start = [], 0
    for n in lengths:
        need = -(-n // TPB)
        tables.append(perm[start : start + need].tolist())
        start += need
    # (seq, start, count, logits) per step; every seq ends fully written.
    steps = [
        [(0, 0, 10, 0), (1, 0, 9, 9), (3, 0, 3, 1)],
        [(0, 10, 13, 1), (1, 9 - 9, 0, 0), (2, 0, 2, 2), (3, 3, 20, 20), (4, 0, 6, 0)],
        [(3, 23, 1, 1), (4, 6, 8, 8), (5, 0, 17, 1)],
        [(3, 24, 4, 4)],  # draft-verification shaped: 1 + 3 tokens, logits for all
        [(3, 28, 1, 1), (0, 22 - 22, 0, 0)],
        [(3, 29, 2, 1)],
    ]
    for step in steps:
        items, expect = [], []
        for s, st, cnt, nl in step:
            if cnt == 0:
                continue
            items.append(SeqInput(seqs[s][st : st + cnt], st, tables[s], nl))
            if nl:
                expect.append(refs[s][st + cnt - nl : st + cnt])
        out = model(ForwardBatch.build(items, TPB), kv)
        torch.testing.assert_close(out, torch.cat(expect), atol=ATOL, rtol=0)


def test_mixed_batch_llama(tiny_llama):
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    run_mixed_batch(hf, model, config)


def test_many_decodes_batched(tiny_llama):
    """A decode batch of 40 sequences with different lengths: one padded group per layer."""
    hf, folder = tiny_llama
    model, config, _ = load_model(str(folder))
    kv = make_storage(config, num_blocks=600)
    seqs = [prompt(5 + (i * 7) % 29, 100 + i) for i in range(40)]
    tables, nxt = [], 1
    for s in seqs:
        need = -(-len(s) // TPB)
        tables.append(list(range(nxt + need - 1, nxt - 1, -1)))  # reversed order
        nxt += need
    prefill = [SeqInput(s[:-1], 0, t, 0) for s, t in zip(seqs, tables)]
    model(ForwardBatch.build(prefill, TPB), kv)
    decode = [SeqInput(s[-1:], len(s) - 1, t, 1) for s, t in zip(seqs, tables)]
    out = model(ForwardBatch.build(decode, TPB), kv)
    expect = torch.stack([hf_logits(hf, s)[-1] for s in seqs])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {"sliding_window": 8, "head_dim": 32}),
    ],
)
def test_other_architectures(tmp_path, arch, overrides):
    hf = save_tiny(tmp_path, arch, **overrides)
    model, config, _ = load_model(str(tmp_path))
    assert config.architecture == arch
    run_mixed_batch(hf, model, config)
