"""Speculation end to end on tiny random-weight Llamas: a separate draft checkpoint (written here, with
the target's vocabulary, as tests/conftest.py writes the target) is loaded and used, a vocabulary
mismatch is a clear ConfigError, and a sampled run with a fixed seed completes with acceptance metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_testlib import collect, make_engine, random_prompts, submit

from kvsched.core.errors import ConfigError
from kvsched.core.request import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_VOCAB = 256  # the target's (tests/conftest.py)
MAX_TOKENS = 16


def _write_checkpoint(path: Path, vocab: int, seed: int) -> Path:
    """A one-layer, narrower Llama: a different model from the target, same tokenizer space if vocab agrees."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("tiny-draft"), TINY_VOCAB, seed=1)


def _prompts() -> list[list[int]]:
    return random_prompts([30, 55, 12], seed=4)


def _greedy(path, **kw) -> tuple[dict, object]:
    ex = make_engine(path, num_device_blocks=64, tokens_per_block=8, **kw)
    submit(ex, _prompts(), MAX_TOKENS)
    return collect(ex), ex


def test_a_separate_draft_checkpoint_is_loaded_and_greedy_stays_identical(tiny_llama_dir, draft_dir):
    want, _ = _greedy(tiny_llama_dir)
    got, ex = _greedy(
        tiny_llama_dir, speculative="draft", draft_model=str(draft_dir), num_speculative_tokens=3
    )
    assert got == want
    dc = ex.parts.draft_model.config
    assert (dc.num_layers, dc.hidden_size) == (1, 32)  # the checkpoint, not a truncated target
    assert ex.parts.draft_storage is not None and ex.get_stats().num_draft_tokens > 0
    # the target's own checkpoint as the draft: the same model proposes, so nearly every draft is kept
    same, ex_same = _greedy(
        tiny_llama_dir, speculative="draft", draft_model=str(tiny_llama_dir), num_speculative_tokens=3
    )
    assert same == want
    assert ex_same.get_stats().acceptance_rate > 0.9 > ex.get_stats().acceptance_rate


def test_a_draft_checkpoint_with_another_vocabulary_is_a_clear_error(tiny_llama_dir, tmp_path):
    other = _write_checkpoint(tmp_path / "wide", TINY_VOCAB + 64, seed=2)
    with pytest.raises(ConfigError, match=r"vocabulary of 320 tokens, the target 256"):
        make_engine(tiny_llama_dir, speculative="draft", draft_model=str(other))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_sampled_run_with_a_fixed_seed_completes_with_acceptance_metrics(tiny_llama_dir, method):
    from kvsched import LLM

    extra = {"draft_model": str(tiny_llama_dir)} if method == "draft" else {}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=7)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    runs = []
    for _ in range(2):
        llm = LLM(
            str(tiny_llama_dir), num_device_blocks=64, speculative=method, num_speculative_tokens=3, **extra
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
        for o in outs:
            assert len(o.outputs[0].token_ids) == MAX_TOKENS and o.outputs[0].finish_reason == "length"
            m = o.metrics
            assert m.num_speculative_steps > 0
            assert 0.0 <= m.acceptance_rate <= 1.0
            assert m.mean_accepted_tokens_per_step == m.num_accepted_draft_tokens / m.num_speculative_steps
        stats = llm.engine.get_stats()
        assert stats.num_draft_tokens == sum(o.metrics.num_draft_tokens for o in outs) > 0
    assert runs[0] == runs[1]  # a fixed seed gives the same tokens
    if method == "draft":  # p == q under sampling: the rejection rule keeps (almost) every draft
        assert stats.acceptance_rate > 0.9
