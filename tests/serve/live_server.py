"""A live server on 127.0.0.1 (uvicorn in a thread, free port) over any engine (real or fake)."""

from __future__ import annotations

import httpx
import openai

from kvsched.serve.app import ServerOptions, build_app
from kvsched.serve.backend import EngineBackend
from kvsched.serve.server_thread import UvicornThread

MODEL = "fake-model"


class LiveServer:
    def __init__(self, fake, options: ServerOptions | None = None, model: str = MODEL) -> None:
        self.fake = fake
        self.app = build_app(EngineBackend(fake), model, options)
        self.thread = UvicornThread(self.app)

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def engine(self):
        return self.app.state.engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key="none",
            max_retries=0,
            http_client=httpx.Client(trust_env=False),
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()
