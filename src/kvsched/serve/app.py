"""The FastAPI app: OpenAI routes, /health, /metrics, and the engine's lifespan.

``build_app(backend, model_name)`` takes any :class:`~kvsched.serve.backend.Backend`; the CLI passes an
EngineBackend over the real engine, tests may pass one over a fake engine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvsched.core.errors import ConfigError
from kvsched.serve.async_engine import AsyncEngine, RequestHandle
from kvsched.serve.auth import APIKeyMiddleware, check_api_key, open_paths
from kvsched.serve.backend import Backend
from kvsched.serve.chunks import ChatChunks, CompletionChunks
from kvsched.serve.errors import APIError, install_error_handlers, status_of
from kvsched.serve.generation import (
    Collected,
    Formatter,
    check_context,
    collect,
    hold_logprobs,
    sampling_params,
    sse_stream,
    usage,
)
from kvsched.serve.guards import DEFAULT_MAX_REQUEST_BYTES, install_guards
from kvsched.serve.lora_admin import install_lora_admin
from kvsched.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvsched.serve.prompts import PromptEncoder
from kvsched.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from kvsched.serve.tenancy import check_header_name, salt_id, tenant_of

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Default ``--max-tokens-cap``: a request without max_tokens no longer runs to the end of a long context.
DEFAULT_MAX_TOKENS_CAP = 4096


@dataclass(slots=True)
class ServerOptions:
    max_waiting: int = 1024  # requests without a first token before new ones get 429
    drain_timeout_s: float = 10.0  # on shutdown, how long running requests may finish
    api_key: str | None = None  # Bearer key for every path but /health (serve/auth.py); None: open
    metrics_open: bool = False  # with an api_key, serve /metrics without it
    tenant_salt_header: str | None = None  # header naming the tenant's cache scope (serve/tenancy.py)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get a 413 (serve/guards.py)
    # max_tokens at most this (clamped, as vLLM's max_new_tokens); None: the rest of the context
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (serve/lora_admin.py); off: both are 404
    enable_lora_runtime_updates: bool = False

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ConfigError(f"max_tokens_cap must be >= 1 (or None), got {self.max_tokens_cap}")


def build_app(backend: Backend, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    opts = options or ServerOptions()
    metrics = ServerMetrics(model_name)
    engine = AsyncEngine(backend, metrics, max_waiting=opts.max_waiting)
    prompts = PromptEncoder(backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(opts.drain_timeout_s)
        prompts.close()

    app = FastAPI(title="kvsched", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.drain = lambda: engine.drain(opts.drain_timeout_s)  # serve/server_thread.DrainingServer
    install_error_handlers(app)
    if opts.api_key is not None:
        key = check_api_key(opts.api_key)
        app.add_middleware(APIKeyMiddleware, api_key=key, public=open_paths(opts.metrics_open))
    salt_header = None if opts.tenant_salt_header is None else check_header_name(opts.tenant_salt_header)

    def served_adapters() -> tuple[str, ...]:
        """Adapter names now (the engine thread replaces the tuple when adapters load or unload)."""
        return tuple(getattr(backend, "lora_names", ()))

    def check_model(name: str) -> str | None:
        """The request's LoRA adapter (``model`` names one of ``--lora-modules``), None for the base."""
        if name == model_name:
            return None
        adapters = served_adapters()
        if name in adapters:
            return name
        served = ", ".join(f"`{m}`" for m in (model_name, *adapters))
        raise APIError(404, f"The model `{name}` does not exist; this server serves {served}.", "model")

    def cache_salt(body_salt: str | None, raw: Request) -> int | None:
        return salt_id(tenant_of(raw.headers, salt_header), body_salt)

    async def start(
        token_ids: list[int],
        params,
        priority: int,
        salt: int | None = None,
        lora: str | None = None,
        session: str | None = None,
    ) -> RequestHandle:
        handle = engine.submit(token_ids, params, priority, cache_salt=salt, lora=lora, session=session)
        try:
            await handle.accepted()
        except Exception as exc:
            handle.close()
            if lora is not None and lora not in served_adapters():  # unloaded after check_model
                message = f"The model `{lora}` does not exist (its adapter was unloaded)."
                raise APIError(404, message, "model") from exc
            status, message = status_of(exc)
            raise APIError(status, message) from exc
        return handle

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return Response("engine not running", status_code=503)
        replicas = getattr(backend, "health_report", None)  # engine replicas (serve/replicas): one each
        if replicas is None:
            return Response(status_code=200)
        report = await replicas()
        alive = any(r["alive"] for r in report)
        return JSONResponse({"replicas": report}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        names = (model_name, *served_adapters())
        return ModelList(data=[ModelCard(id=n, max_model_len=backend.max_model_len) for n in names])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        lora = check_model(req.model)
        ids = await prompts.completion(req.prompt)
        max_tokens = check_context(len(ids), req.max_tokens, backend.max_model_len, opts.max_tokens_cap)
        params = sampling_params(req, max_tokens, req.logprobs)
        handle = await start(ids, params, req.priority, cache_salt(req.cache_salt, raw), lora, req.user)
        rid, fmt = f"cmpl-{uuid.uuid4().hex}", Formatter(backend.token_text, req.logprobs or 0)
        want_lp = req.logprobs is not None
        if req.stream:
            offset, enc, held = [0], CompletionChunks(rid, req.model), Collected()

            def chunk(d) -> str | None:
                if want_lp:  # a token whose text is held back sends its logprobs with the next chunk
                    hold_logprobs(held, d)
                if not d.text_delta and not d.finished:
                    return None
                lp = None
                if want_lp:
                    lp = fmt.completion_logprobs(held.token_ids, held.logprobs, offset[0], held.top_logprobs)
                    held.token_ids, held.logprobs, held.top_logprobs = [], [], []
                offset[0] += len(d.text_delta)
                return enc.delta(d.text_delta, d.finish_reason, lp)

            usage_chunk = (lambda: enc.usage(usage(handle))) if req.include_usage else None
            body = sse_stream(handle, chunk, usage_chunk)
            return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        got = await collect(handle, raw.is_disconnected)
        lp = fmt.completion_logprobs(got.token_ids, got.logprobs, 0, got.top_logprobs) if want_lp else None
        choice = CompletionChoice(text=got.text, logprobs=lp, finish_reason=got.finish_reason)
        return CompletionResponse(id=rid, model=req.model, choices=[choice], usage=usage(handle))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        lora = check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await prompts.chat(messages)
        max_tokens = check_context(len(ids), req.max_tokens, backend.max_model_len, opts.max_tokens_cap)
        num_top = (req.top_logprobs or 0) if req.logprobs else 0
        params = sampling_params(req, max_tokens, num_top if req.logprobs else None)
        handle = await start(ids, params, req.priority, cache_salt(req.cache_salt, raw), lora, req.user)
        rid, fmt = f"chatcmpl-{uuid.uuid4().hex}", Formatter(backend.token_text, num_top)
        if req.stream:
            first, enc, held = [True], ChatChunks(rid, req.model), Collected()

            def chunk(d) -> str | None:
                if req.logprobs:  # a token whose text is held back sends its logprobs with the next chunk
                    hold_logprobs(held, d)
                if not d.text_delta and not d.finished and not first[0]:
                    return None
                lp = None
                if req.logprobs:
                    lp = fmt.chat_logprobs(held.token_ids, held.logprobs, held.top_logprobs)
                    held.token_ids, held.logprobs, held.top_logprobs = [], [], []
                body = enc.delta(d.text_delta, d.finish_reason, lp, first=first[0])
                first[0] = False
                return body

            usage_chunk = (lambda: enc.usage(usage(handle))) if req.include_usage else None
            body = sse_stream(handle, chunk, usage_chunk)
            return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        got = await collect(handle, raw.is_disconnected)
        lp = fmt.chat_logprobs(got.token_ids, got.logprobs, got.top_logprobs) if req.logprobs else None
        choice = ChatChoice(
            message=ChatResponseMessage(content=got.text), logprobs=lp, finish_reason=got.finish_reason
        )
        return ChatCompletionResponse(id=rid, model=req.model, choices=[choice], usage=usage(handle))

    if opts.enable_lora_runtime_updates:
        install_lora_admin(app, engine, backend, model_name)
    install_guards(app, opts.max_request_bytes)
    return app
