"""Streaming through the server with speculative decoding (tiny random-weight Llama, real tokenizer):
the streamed text, finish reason and usage equal ``LLM.generate`` without speculation, for both
proposers, while drafts are accepted (several tokens in one step): the stream loses or repeats none."""

from __future__ import annotations

import pytest
from live_server import MODEL, LiveServer
from tiny_engine import tiny_engine, tiny_llm

from kvsched.core.request import SamplingParams

PROMPTS = ["1, 2, 3, 4, 5, 6,", "The capital of France is", "abc abc abc abc"]
MAX_TOKENS = 16
SPECS = {"ngram": {}, "draft": {"draft_num_layers": 1}}


@pytest.fixture(scope="module")
def reference():
    outs = tiny_llm().generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False
    )
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("method", list(SPECS))
def test_streamed_text_with_speculation_equals_text_without(method, reference) -> None:
    ex = tiny_engine(speculative=method, num_speculative_tokens=3, **SPECS[method])
    with LiveServer(ex) as srv:
        client = srv.client()
        for prompt, ref in zip(PROMPTS, reference):
            chunks = list(
                client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert text == ref.text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
            assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
            chat = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            want = (
                tiny_llm()
                .chat(
                    [{"role": "user", "content": prompt}],
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                    use_tqdm=False,
                )[0]
                .outputs[0]
            )
            assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == want.text
    stats = ex.get_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_draft_tokens > 0  # drafts were kept
