"""Runtime LoRA updating, as vLLM offers it behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: off by default,
enabled by ``kvsched serve --enable-lora-runtime-updates``.

``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
``{"lora_name"}``. The change runs on the engine thread (``AsyncEngine.call``), never in the handler.
Unloading an adapter that an unfinished request still uses answers 409: the client retries after
those requests finish (the adapter is never pulled from under a running request).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from kvsched.core.errors import ConfigError, InvalidRequestError, UnsupportedFeatureError
from kvsched.core.peft import AdapterInUseError, AdapterNotFoundError
from kvsched.serve.async_engine import AsyncEngine
from kvsched.serve.backend import Backend
from kvsched.serve.errors import APIError
from kvsched.serve.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest


async def _on_engine(engine: AsyncEngine, fn: Callable[[], None], param: str) -> None:
    """Run an adapter change on the engine thread; its typed errors become OpenAI-shaped ones."""
    try:
        await engine.call(fn)
    except AdapterNotFoundError as exc:
        raise APIError(404, str(exc), param) from exc
    except AdapterInUseError as exc:
        raise APIError(409, str(exc), "lora_name") from exc
    except (ConfigError, InvalidRequestError, UnsupportedFeatureError) as exc:
        raise APIError(400, str(exc)) from exc


def install_lora_admin(app: FastAPI, engine: AsyncEngine, backend: Backend, model_name: str) -> None:
    load = getattr(backend, "load_lora_adapter", None)
    unload = getattr(backend, "unload_lora_adapter", None)

    def _require(fn: object) -> None:
        if fn is None:
            raise APIError(400, "this server's backend cannot load or unload LoRA adapters")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraAdapterRequest) -> PlainTextResponse:
        _require(load)
        assert load is not None
        if req.lora_name == model_name:
            raise APIError(400, f"lora_name {req.lora_name!r} is the base model's name", "lora_name")
        await _on_engine(engine, lambda: load(req.lora_name, req.lora_path), "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraAdapterRequest) -> PlainTextResponse:
        _require(unload)
        assert unload is not None
        await _on_engine(engine, lambda: unload(req.lora_name), "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
