"""Drive a server with a prompt set: arrivals (Poisson/gamma or trace times), a concurrency cap,
one streaming request per prompt, a progress bar; then aggregate."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm

from kvsched.bench.client import RequestResult, RequestSpec, send_request
from kvsched.bench.datasets import SampleRequest
from kvsched.bench.metrics import BenchmarkMetrics, compute_metrics
from kvsched.core.errors import ConfigError, KVSchedError

_SHARD = 8  # connections per httpx pool


class ServerUnreachableError(KVSchedError, RuntimeError):
    """The first test request failed: wrong URL, model name, or the server is down.

    A kvsched error, so the command line reports it as one line and exits with status 2."""


@dataclass(slots=True)
class LoadConfig:
    """How requests are released: ``request_rate`` per second (inf = all at once), gamma
    ``burstiness`` (1 = Poisson), optional concurrency cap, or the trace's own arrival times."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    use_trace_timestamps: bool = False
    seed: int = 0
    timeout_s: float = 600.0
    progress: bool = True
    initial_test: bool = True

    def __post_init__(self) -> None:
        if self.request_rate <= 0:
            raise ConfigError(f"request_rate={self.request_rate} is invalid: must be > 0 (or inf)")
        if self.burstiness <= 0:
            raise ConfigError(f"burstiness={self.burstiness} is invalid: must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency={self.max_concurrency} is invalid: must be >= 1")


def arrival_offsets(samples: Sequence[SampleRequest], load: LoadConfig) -> list[float]:
    """Send time of each request, in seconds from the start."""
    if load.use_trace_timestamps:
        if any(s.arrival_s is None for s in samples):
            raise ConfigError("--use-trace-timestamps needs a dataset with arrival times (mooncake)")
        t0 = samples[0].arrival_s or 0.0
        return [(s.arrival_s or 0.0) - t0 for s in samples]
    if math.isinf(load.request_rate):
        return [0.0] * len(samples)
    rng = random.Random(load.seed)
    theta = 1.0 / (load.request_rate * load.burstiness)
    t, out = 0.0, []
    for _ in samples:
        out.append(t)
        t += rng.gammavariate(load.burstiness, theta)
    return out


async def _check_server(client: httpx.AsyncClient, spec: RequestSpec, sample: SampleRequest) -> None:
    probe = SampleRequest(sample.prompt, sample.prompt_len, min(4, sample.expected_output_len))
    res = await send_request(client, spec, probe)
    if not res.success:
        raise ServerUnreachableError(f"initial test request to {spec.api_url} failed: {res.error}")


def _client_slots(limit: int, timeout: httpx.Timeout) -> tuple[list[httpx.AsyncClient], asyncio.Queue]:
    """``limit`` slots over small connection pools: httpcore scans its whole pool for every request,
    so one pool of hundreds of connections makes the client, not the server, the bottleneck."""
    ctx = ssl.create_default_context()  # shared: building one per client costs ~100 ms
    clients = [
        httpx.AsyncClient(
            limits=httpx.Limits(max_connections=_SHARD, max_keepalive_connections=_SHARD),
            timeout=timeout,
            trust_env=False,
            verify=ctx,
        )
        for _ in range(-(-limit // _SHARD))
    ]
    slots: asyncio.Queue = asyncio.Queue()
    for i in range(limit):
        slots.put_nowait(clients[i % len(clients)])
    return clients, slots


async def run_load(
    spec: RequestSpec, samples: Sequence[SampleRequest], load: LoadConfig
) -> tuple[list[RequestResult], float]:
    """Send every sample; returns results in sample order and the benchmark duration."""
    if not samples:
        raise ConfigError("the dataset is empty")
    offsets = arrival_offsets(samples, load)
    limit = load.max_concurrency or len(samples)
    timeout = httpx.Timeout(load.timeout_s, connect=min(30.0, load.timeout_s))
    clients, slots = _client_slots(limit, timeout)
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        if load.initial_test:
            await _check_server(clients[0], spec, samples[0])
        bar = tqdm(total=len(samples), disable=not load.progress, desc="requests")
        start = time.perf_counter()

        async def one(sample: SampleRequest, offset: float) -> RequestResult:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            client = await slots.get()  # the concurrency cap
            try:
                res = await send_request(client, spec, sample)
            finally:
                slots.put_nowait(client)
            bar.update(1)
            return res

        results = await asyncio.gather(*(one(s, o) for s, o in zip(samples, offsets)))
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def run_benchmark(
    spec: RequestSpec,
    samples: Sequence[SampleRequest],
    load: LoadConfig,
    *,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = (99.0,),
) -> tuple[BenchmarkMetrics, list[RequestResult]]:
    """Synchronous entry point: run the load and aggregate it."""
    results, duration = asyncio.run(run_load(spec, samples, load))
    return compute_metrics(results, duration, slos=slos, percentiles=percentiles), results
