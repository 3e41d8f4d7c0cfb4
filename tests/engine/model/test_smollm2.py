"""The real default model (SmolLM2-135M-Instruct GGUF) against HF transformers loading the same file."""

from __future__ import annotations

import pytest
import torch
from model_testlib import FakeKVStorage

from kvsched.engine.forward_batch import ForwardBatch, SeqInput
from kvsched.engine.weights.loader import default_model_path, load_model

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TEXTS = [
    "Hello world!",
    "  leading spaces\n\nand 12345 digits 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
    "émoji 🤗 中文 测试, don't I'll",
    "a\tb\r\nc   d",
]


@pytest.fixture(scope="module")
def ours():
    return load_model(None)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def greedy(model, config, prompt: list[int], new_tokens: int, tpb: int = 16) -> list[int]:
    kv = FakeKVStorage(config.num_layers, 8, tpb, config.num_kv_heads, config.head_dim)
    table = [5, 2, 7, 1, 6, 3, 4]
    out: list[int] = []
    tokens, start = prompt, 0
    for _ in range(new_tokens):
        logits = model(ForwardBatch.build([SeqInput(tokens, start, table, 1)], tpb), kv)
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if nxt in config.eos_token_ids:
            break
        start += len(tokens)
        tokens = [nxt]
    return out


def test_tokenizer_matches_hf(ours, hf_tokenizer):
    _, _, tok = ours
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    chat = tok.apply_chat_template(QUESTION)
    assert chat == hf_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    hf_ids = hf_tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    assert tok.encode_chat(QUESTION) == hf_ids
    assert tok.eos_token_ids == (hf_tokenizer.eos_token_id,)


def test_greedy_matches_hf_and_answers_paris(ours, hf_smollm2):
    model, config, tok = ours
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    prompt = tok.encode_chat(QUESTION)
    mine = greedy(model, config, prompt, 10)
    hf = hf_smollm2
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    ref = ref[: ref.index(config.eos_token_id) + 1] if config.eos_token_id in ref else ref
    assert mine == ref
    assert tok.decode(mine).startswith("The capital of France is Paris.")
