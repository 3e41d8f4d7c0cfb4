"""`kvsched serve`: the OpenAI-compatible server over the engine (flags: server + every engine flag)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvsched.serve.app import ServerOptions

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # as serve/guards.py (not imported: it pulls in FastAPI)
DEFAULT_MAX_TOKENS_CAP = 4096  # as serve/app.py


def count_type(minimum: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from kvsched.engine.engine_args import add_engine_flags  # torch-free: flags only
    from kvsched.serve.replicas.flags import add_replica_flags  # neither Ray nor torch: flags only

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="name clients send (default: from --model)")
    p.add_argument("--max-waiting", type=int, default=1024, help="requests without a first token before 429s")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish requests on shutdown")
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every path but /health (default: $KVSCHED_API_KEY)",
    )
    p.add_argument("--metrics-open", action="store_true", help="with an API key, serve /metrics without it")
    p.add_argument(
        "--tenant-salt-header",
        default=None,
        metavar="NAME",
        help="header a gateway sets to the tenant: its requests get their own prefix cache scope",
    )
    p.add_argument(
        "--max-request-bytes",
        type=count_type(1),
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="larger request bodies get a 413, refused before they are read (default: 4 MiB)",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=count_type(0),
        default=DEFAULT_MAX_TOKENS_CAP,
        metavar="N",
        help="max_tokens is at most N: a larger or missing one is clamped (default: 4096; 0: only the "
        "context length limits it)",
    )
    p.add_argument(
        "--enable-lora-runtime-updates",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); builds the engine LoRA-capable even without --lora-modules",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_replica_flags(p)
    add_engine_flags(p)
    p.set_defaults(func=run)


def served_name(model: str | None, override: str | None) -> str:
    if override:
        return override
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The server's options from the ``kvsched serve`` flags (here and in ``serve/ray_app.py``)."""
    import os

    from kvsched.serve.app import ServerOptions
    from kvsched.serve.auth import resolve_api_key
    from kvsched.serve.tenancy import check_header_name

    if args.tenant_salt_header is not None:
        check_header_name(args.tenant_salt_header)  # before any model loads
    return ServerOptions(
        max_waiting=args.max_waiting,
        drain_timeout_s=args.drain_timeout,
        api_key=resolve_api_key(args.api_key, os.environ),
        metrics_open=args.metrics_open,
        tenant_salt_header=args.tenant_salt_header,
        max_request_bytes=args.max_request_bytes,
        max_tokens_cap=args.max_tokens_cap or None,
        enable_lora_runtime_updates=args.enable_lora_runtime_updates,
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from kvsched.engine.engine import Engine
    from kvsched.engine.engine_args import engine_args_from_namespace
    from kvsched.serve.app import build_app
    from kvsched.serve.backend import EngineBackend
    from kvsched.serve.server_thread import DrainingServer

    # A bad flag or a missing model is a typed error: `kvsched.cli.main` prints it as one line.
    if args.replicas > 1:
        from kvsched.serve.replicas.flags import check_replica_flags

        check_replica_flags(args)  # before any model loads: no Ray is a one-line error
    options = server_options(args)
    engine_args = engine_args_from_namespace(args)
    if args.enable_lora_runtime_updates and not engine_args.enable_lora:
        engine_args = dataclasses.replace(engine_args, enable_lora=True)
    name = served_name(engine_args.model, args.served_model_name)
    if args.replicas > 1:
        from kvsched.serve.replicas.flags import start_from_flags

        backend, stop = start_from_flags(args, engine_args)
    else:  # one engine in this process, as before
        backend, stop = EngineBackend(Engine(engine_args)), None
    app = build_app(backend, name, options)
    auth = "API key required" if options.api_key else "no API key"
    where = f"{args.replicas} replicas, router {args.router}" if args.replicas > 1 else "one engine"
    print(
        f"kvsched serve: model {name!r} on http://{args.host}:{args.port}/v1 ({where}; {auth})",
        file=sys.stderr,
    )
    # The app drains first (DrainingServer); uvicorn's own graceful timeout only covers the last bytes.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    try:
        DrainingServer(config).run()
    finally:
        if stop is not None:
            stop()
    return 0
