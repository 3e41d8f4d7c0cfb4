"""``kvsched serve --replicas N --router KIND``: the flags, their checks, and starting the replicas.

Importing this module imports neither Ray nor torch (the parser is built for every command).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.serve.cli import count_type  # the serve flags' integer type (stdlib imports only)

#: As ``kvsched.core.routing.ROUTER_KINDS`` (not imported here: the parser stays light).
ROUTER_CHOICES = ("round_robin", "least_loaded", "sticky", "kv_aware")


def _router(text: str) -> str:
    name = text.strip().lower().replace("-", "_")
    if name not in ROUTER_CHOICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(ROUTER_CHOICES)}")
    return name


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine replicas (Ray; pip install 'kvsched[ray]')")
    g.add_argument(
        "--replicas",
        type=count_type(1),
        default=1,
        metavar="N",
        help="engine replicas, each a Ray actor with its own KV pools (default 1: one engine in this "
        "process, no Ray)",
    )
    g.add_argument(
        "--router",
        type=_router,
        default="kv_aware",
        metavar="KIND",
        help=f"how requests pick a replica: {', '.join(ROUTER_CHOICES)} (default kv_aware)",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster (`ray start --head` prints it; 'auto' finds a local one); "
        "default: start a Ray instance in this process",
    )
    g.add_argument(
        "--replica-cpus", type=float, default=1.0, metavar="C", help="CPUs Ray reserves per replica"
    )
    g.add_argument(
        "--replica-gpus", type=float, default=0.0, metavar="G", help="GPUs Ray reserves per replica"
    )
    g.add_argument(
        "--replica-start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for every replica to load its model (a cluster short of CPUs waits forever)",
    )


def check_replica_flags(args: argparse.Namespace) -> None:
    """Refuse what replicas do not support, and a missing Ray, before anything loads."""
    from kvsched.serve.replicas import require_ray

    require_ray()
    if args.enable_lora_runtime_updates:
        raise ConfigError("--enable-lora-runtime-updates is not supported with --replicas > 1 yet")
    for name in ("replica_cpus", "replica_gpus"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def replicas_from_flags(args: argparse.Namespace, engine_args: Any) -> Any:
    """The ``ReplicatedBackend`` the replica flags ask for, on the Ray this process is connected to."""
    from kvsched.serve.replicas.launch import start_replicas

    return start_replicas(
        engine_args,
        args.replicas,
        args.router,
        num_cpus=args.replica_cpus,
        num_gpus=args.replica_gpus,
        timeout_s=args.replica_start_timeout,
    )


def start_from_flags(args: argparse.Namespace, engine_args: Any) -> tuple[Any, Callable[[], None]]:
    """Connect to (or start) Ray, start the replicas; returns the backend and what stops them."""
    import ray

    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    try:
        backend = replicas_from_flags(args, engine_args)
    except BaseException:
        ray.shutdown()
        raise

    def stop() -> None:
        backend.shutdown()
        ray.shutdown()

    return backend, stop
