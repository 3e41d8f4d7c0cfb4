"""Start N engine replicas as Ray actors and the :class:`ReplicatedBackend` over them."""

from __future__ import annotations

from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.core.routing import make_router
from kvsched.engine.engine_args import EngineArgs
from kvsched.serve.replicas import require_ray
from kvsched.serve.replicas.backend import PROBE_GROUP, ReplicatedBackend
from kvsched.serve.replicas.frontend import load_tokenizer
from kvsched.serve.replicas.replica import EngineReplica


def start_replicas(
    engine_args: EngineArgs,
    num_replicas: int,
    router: str = "kv_aware",
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    timeout_s: float | None = None,
    router_options: dict[str, Any] | None = None,
) -> ReplicatedBackend:
    """Start ``num_replicas`` actors (``num_cpus`` / ``num_gpus`` each, Ray's resource requests) on the
    Ray cluster this process is connected to (``ray.init`` first, or this starts a local one), wait
    (up to ``timeout_s``, None: no limit) until every engine has loaded, and return the backend that routes over them with ``router``."""
    ray = require_ray()
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ConfigError(f"num_replicas={num_replicas!r} is invalid: must be an integer >= 1")
    tokenizer = load_tokenizer(engine_args.model)  # a missing model fails here, before any actor
    remote = ray.remote(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, concurrency_groups={PROBE_GROUP: 1}
    )(EngineReplica)
    actors = [remote.remote(engine_args) for _ in range(num_replicas)]
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=timeout_s)
    except Exception as exc:
        for a in actors:
            ray.kill(a)
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            raise ConfigError(
                f"{num_replicas} replicas did not start within {timeout_s:g} s: does the Ray cluster have "
                f"{num_replicas} x {num_cpus:g} CPUs (and {num_replicas} x {num_gpus:g} GPUs) free?"
            ) from None
        raise
    info = infos[0]
    rt = make_router(router, block_size=info.tokens_per_block, **(router_options or {}))
    return ReplicatedBackend(actors, info, tokenizer, rt)
