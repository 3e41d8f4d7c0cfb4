"""The real default model (SmolLM2-135M): greedy text through the server equals ``LLM.generate``."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from live_server import LiveServer

from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.llm import LLM
from kvsched.engine.parts import build_engine_parts

pytestmark = pytest.mark.slow

NAME = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "Water boils at"
N = 10


def test_default_model_greedy_equality() -> None:
    llm = LLM(None, num_device_blocks=256, max_model_len=1024)
    params = SamplingParams(max_tokens=N, temperature=0.0)
    inputs = [PROMPT, {"prompt_token_ids": llm.encode_chat(QUESTION)}]
    want_text, want_chat = (o.outputs[0].text for o in llm.generate(inputs, params, use_tqdm=False))
    parts = llm.engine.parts  # the server's engine shares the loaded weights, not the KV or requests
    loaded = (parts.model, parts.model_config, parts.tokenizer)
    server_engine = Engine(llm.engine.args, parts=build_engine_parts(llm.engine.args, loaded=loaded))
    with LiveServer(server_engine, model=NAME) as srv:

        async def both():  # concurrently: one batch, half the decode steps
            http = httpx.AsyncClient(trust_env=False, timeout=600)
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", http_client=http)
            async with http:
                return await asyncio.gather(
                    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=N, temperature=0),
                    client.chat.completions.create(
                        model=NAME, messages=QUESTION, max_tokens=N, temperature=0
                    ),
                )

        completion, chat = asyncio.run(both())
    assert completion.choices[0].text == want_text
    assert chat.choices[0].message.content == want_chat
    assert want_chat.startswith("The capital of France is Paris")
