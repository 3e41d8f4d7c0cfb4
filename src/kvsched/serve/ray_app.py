"""The OpenAI server with engine replicas as a Ray Serve application, for an existing Ray cluster.

    serve run kvsched.serve.ray_app:app                                  # defaults: 2 replicas, kv_aware
    serve run kvsched.serve.ray_app:build_app replicas=4 router=kv_aware model=/models/llama device_kv_bytes=4000000000

``build_app(args)`` is a Ray Serve application builder (``serve run module:builder key=value ...``): each
``key=value`` is the ``kvsched serve`` flag ``--key value`` (``true`` alone for a switch), so every server
and engine flag works, ``replicas`` and ``router`` included. One ingress deployment serves our FastAPI app
through Serve's FastAPI ingress (``serve.ingress`` with a builder evaluated on the Serve replica); the
engine replicas are Ray actors it starts, owned by it (they end with the deployment). Routing, failure
handling, /health and /metrics are those of ``kvsched serve --replicas N`` (``serve/replicas``).
The ingress is one Serve replica on purpose: the KV-aware router's prefix index lives in it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray import serve

from kvsched.core.errors import ConfigError

if TYPE_CHECKING:
    from kvsched.serve.app import ServerOptions

DEFAULT_REPLICAS = 2


def flags_from_args(args: Mapping[str, Any]) -> list[str]:
    """``{"replicas": "2", "enable_block_reuse": "false"}`` -> ``["--replicas", "2", "--no-enable-block-reuse"]``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        text = str(value)
        if text.lower() in ("true", ""):
            argv.append(flag)
        elif text.lower() == "false":
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, text]
    return argv


def parse_args(args: Mapping[str, Any]) -> argparse.Namespace:
    """The ``kvsched serve`` flags from a builder's ``args``; a bad one is a ConfigError naming it."""
    from kvsched.cli import build_parser

    argv = flags_from_args({"replicas": DEFAULT_REPLICAS, **args})
    parser = build_parser()
    try:
        ns = parser.parse_args(["serve", *argv])
    except SystemExit:
        raise ConfigError(f"bad kvsched.serve.ray_app arguments {dict(args)!r} (flags {argv})") from None
    return ns


def _asgi_builder(ns: argparse.Namespace, options: ServerOptions) -> Any:
    """A function Serve calls on its replica to make the ASGI app (it starts the engine replicas)."""

    def build() -> Any:
        from kvsched.engine.engine_args import engine_args_from_namespace
        from kvsched.serve.app import build_app
        from kvsched.serve.cli import served_name
        from kvsched.serve.replicas.flags import replicas_from_flags

        engine_args = engine_args_from_namespace(ns)
        backend = replicas_from_flags(ns, engine_args)
        return build_app(backend, served_name(engine_args.model, ns.served_model_name), options)

    return build


class _Ingress:
    """The Serve deployment's class: Serve's ingress wrapper serves the FastAPI app built on the replica."""


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """A Ray Serve ``Application`` (``serve.run(build_app({...}))`` or ``serve run ...:build_app k=v``)."""
    from kvsched.serve.cli import server_options
    from kvsched.serve.replicas.flags import check_replica_flags

    ns = parse_args(args or {})
    check_replica_flags(ns)
    # Here, not on the Serve replica: a bad flag fails at ``serve run`` as the others do (the API key
    # is resolved from this process's environment).
    options = server_options(ns)
    ingress = serve.ingress(_asgi_builder(ns, options))(_Ingress)
    deployment = serve.deployment(name="kvsched", num_replicas=1, ray_actor_options={"num_cpus": 0})
    return deployment(ingress).bind()


#: ``serve run kvsched.serve.ray_app:app``: the default model, two replicas, the KV-aware router.
app = build_app()
