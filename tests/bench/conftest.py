"""A tiny OpenAI-compatible streaming server (no engine) for testing the load generator."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvsched.serve.server_thread import UvicornThread

MODEL = "fake-model"


@dataclass
class FakeState:
    in_flight: int = 0
    max_in_flight: int = 0
    received: int = 0
    token_delay_s: float = 0.001
    priorities: list = field(default_factory=list)  # the body's "priority" of each request (None: absent)


def make_fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            n = int(body["max_tokens"])
            prompt_len = len(str(body.get("prompt") or body.get("messages")).split())
            for i in range(n):
                await asyncio.sleep(state.token_delay_s)
                word = f" w{i}"
                choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.received += 1
        state.priorities.append(body.get("priority"))
        if body.get("model") != MODEL:
            err = {"error": {"message": f"model {body.get('model')!r} not found", "type": "NotFoundError"}}
            return JSONResponse(err, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    with UvicornThread(make_fake_app(state)) as srv:
        yield srv, state
