"""Stream chunks serialized from a per-request template: one ``json.dumps`` of the delta text per token
instead of building and dumping pydantic models (the per-token cost of a stream). The output parses as
:class:`~kvsched.serve.protocol.CompletionResponse` / ``ChatCompletionChunk`` (tested)."""

from __future__ import annotations

import json
import time

from pydantic import BaseModel

from kvsched.serve.protocol import UsageInfo

_dumps = json.dumps


def _head(rid: str, obj: str, model: str, created: int) -> str:
    return _dumps({"id": rid, "object": obj, "created": created, "model": model})[:-1]


class CompletionChunks:
    __slots__ = ("_head", "_usage_head")

    def __init__(self, rid: str, model: str, created: int | None = None) -> None:
        head = _head(rid, "text_completion", model, created or int(time.time()))
        self._head = head + ',"choices":[{"index":0,"text":'
        self._usage_head = head + ',"choices":[],"usage":'

    def delta(self, text: str, finish_reason: str | None, logprobs: BaseModel | None = None) -> str:
        lp = "null" if logprobs is None else logprobs.model_dump_json()
        return f'{self._head}{_dumps(text)},"logprobs":{lp},"finish_reason":{_dumps(finish_reason)}}}],"usage":null}}'

    def usage(self, usage: UsageInfo) -> str:
        return f"{self._usage_head}{usage.model_dump_json()}}}"


class ChatChunks:
    __slots__ = ("_head", "_usage_head")

    def __init__(self, rid: str, model: str, created: int | None = None) -> None:
        head = _head(rid, "chat.completion.chunk", model, created or int(time.time()))
        self._head = head + ',"choices":[{"index":0,"delta":{"role":'
        self._usage_head = head + ',"choices":[],"usage":'

    def delta(
        self, text: str, finish_reason: str | None, logprobs: BaseModel | None = None, first: bool = False
    ) -> str:
        role = '"assistant"' if first else "null"
        lp = "null" if logprobs is None else logprobs.model_dump_json()
        return (
            f'{self._head}{role},"content":{_dumps(text)}}},"logprobs":{lp},'
            f'"finish_reason":{_dumps(finish_reason)}}}],"usage":null}}'
        )

    def usage(self, usage: UsageInfo) -> str:
        return f"{self._usage_head}{usage.model_dump_json()}}}"
