"""Template-serialized stream chunks parse as the protocol models, with awkward text escaped."""

from __future__ import annotations

import json

from kvsched.serve.chunks import ChatChunks, CompletionChunks
from kvsched.serve.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatLogprob,
    CompletionResponse,
    UsageInfo,
)

TEXT = 'he said "hi"\n\\ \u00e9\u4e2d \U0001f600'


def test_completion_chunk_round_trip() -> None:
    enc = CompletionChunks("cmpl-1", 'm"odel', created=7)
    parsed = CompletionResponse.model_validate_json(enc.delta(TEXT, None))
    assert (parsed.id, parsed.model, parsed.created) == ("cmpl-1", 'm"odel', 7)
    assert parsed.choices[0].text == TEXT and parsed.choices[0].finish_reason is None
    last = json.loads(enc.delta("", "stop"))
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"] is None
    u = CompletionResponse.model_validate_json(
        enc.usage(UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    )
    assert u.choices == [] and u.usage.total_tokens == 5


def test_chat_chunk_round_trip() -> None:
    enc = ChatChunks("chatcmpl-1", "m", created=1)
    lp = ChatChoiceLogprobs(content=[ChatLogprob(token="a", logprob=-1.0)])
    first = ChatCompletionChunk.model_validate_json(enc.delta(TEXT, None, lp, first=True))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == TEXT
    assert first.choices[0].logprobs.content[0].logprob == -1.0
    later = ChatCompletionChunk.model_validate_json(enc.delta("x", "length"))
    assert later.choices[0].delta.role is None and later.choices[0].finish_reason == "length"
