"""Per-run metrics: latencies per request, inter-token gaps, KV usage over time, and their summary."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvsched.core.errors import ConfigError


@dataclass(slots=True, frozen=True)
class SLO:
    """Latency targets a request must meet to count towards goodput (seconds)."""

    ttft: float = 2.0
    tpot: float = 0.1

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tpot > 0):
            raise ConfigError(f"SLO targets must be > 0, got ttft={self.ttft} tpot={self.tpot}")


def dist(values: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p99, max of a sample (zeros for an empty one)."""
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "mean": float(values.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(values.max()),
    }


@dataclass(slots=True)
class MetricsRecorder:
    """Appends into flat arrays during the run (no per-step objects); `summary()` reduces at the end."""

    arrival: array = field(default_factory=lambda: array("d"))
    first_token: array = field(default_factory=lambda: array("d"))
    finish: array = field(default_factory=lambda: array("d"))
    prompt_len: array = field(default_factory=lambda: array("q"))
    output_len: array = field(default_factory=lambda: array("q"))
    priority: array = field(default_factory=lambda: array("q"))
    itl: array = field(default_factory=lambda: array("d"))
    # timeline, one sample per step: time, device blocks used, host blocks used, batch size, tokens
    t_time: array = field(default_factory=lambda: array("d"))
    t_device: array = field(default_factory=lambda: array("q"))
    t_host: array = field(default_factory=lambda: array("q"))
    t_batch: array = field(default_factory=lambda: array("q"))
    t_tokens: array = field(default_factory=lambda: array("q"))
    t_replica: array = field(default_factory=lambda: array("q"))
    busy_time: float = 0.0
    num_steps: int = 0

    def request_done(
        self, arrival: float, first: float, finish: float, prompt: int, output: int, priority: int = 0
    ) -> None:
        self.arrival.append(arrival)
        self.first_token.append(first)
        self.finish.append(finish)
        self.prompt_len.append(prompt)
        self.output_len.append(output)
        self.priority.append(priority)

    def step(
        self,
        now: float,
        dt: float,
        device_used: int,
        host_used: int,
        batch: int,
        tokens: int,
        replica: int = 0,
    ) -> None:
        self.num_steps += 1
        self.busy_time += dt
        self.t_time.append(now)
        self.t_device.append(device_used)
        self.t_host.append(host_used)
        self.t_batch.append(batch)
        self.t_tokens.append(tokens)
        self.t_replica.append(replica)

    def steps(
        self,
        times: list[float],
        durations: list[float],
        device_used: list[int],
        host_used: list[int],
        batch: int,
        tokens: int,
        replica: int = 0,
    ) -> None:
        """Several consecutive :meth:`step` samples at once (a decode window: same batch and tokens)."""
        n = len(times)
        self.num_steps += n
        busy = self.busy_time
        for dt in durations:  # one add per step, in order: the same float as step() by step()
            busy += dt
        self.busy_time = busy
        self.t_time.extend(times)
        self.t_device.extend(device_used)
        self.t_host.extend(host_used)
        self.t_batch.extend([batch] * n)
        self.t_tokens.extend([tokens] * n)
        self.t_replica.extend([replica] * n)

    def per_request(self) -> dict[str, np.ndarray]:
        arr = np.frombuffer(self.arrival, dtype=np.float64)
        first = np.frombuffer(self.first_token, dtype=np.float64)
        fin = np.frombuffer(self.finish, dtype=np.float64)
        out = np.frombuffer(self.output_len, dtype=np.int64) if len(self.output_len) else np.zeros(0)
        ttft = first - arr
        tpot = np.where(out > 1, (fin - first) / np.maximum(out - 1, 1), 0.0)
        return {"ttft": ttft, "tpot": tpot, "e2e": fin - arr, "output_len": out}

    def summary(self, slo: SLO, num_device_blocks: int, num_host_blocks: int) -> dict[str, Any]:
        n = len(self.arrival)
        r = self.per_request()
        if n:
            start = float(np.frombuffer(self.arrival, dtype=np.float64).min())
            end = float(np.frombuffer(self.finish, dtype=np.float64).max())
        else:
            start = end = 0.0
        span = max(end - start, 1e-12)
        out_tokens = int(r["output_len"].sum()) if n else 0
        prompt_tokens = int(np.frombuffer(self.prompt_len, dtype=np.int64).sum()) if n else 0
        ok = (r["ttft"] <= slo.ttft) & ((r["tpot"] <= slo.tpot) | (r["output_len"] <= 1))
        dev = np.frombuffer(self.t_device, dtype=np.int64) if self.num_steps else np.zeros(1)
        host = np.frombuffer(self.t_host, dtype=np.int64) if self.num_steps else np.zeros(1)
        return {
            "requests": n,
            "duration_s": span if n else 0.0,
            "busy_s": self.busy_time,
            "steps": self.num_steps,
            "request_throughput": n / span if n else 0.0,
            "output_token_throughput": out_tokens / span if n else 0.0,
            "total_token_throughput": (out_tokens + prompt_tokens) / span if n else 0.0,
            "goodput": float(ok.sum()) / span if n else 0.0,
            "slo_attainment": float(ok.mean()) if n else 0.0,
            "ttft": dist(r["ttft"]),
            "tpot": dist(r["tpot"][r["output_len"] > 1]),
            "itl": dist(np.frombuffer(self.itl, dtype=np.float64)),
            "e2e": dist(r["e2e"]),
            "device_usage_mean": float(dev.mean()) / num_device_blocks,
            "device_usage_max": float(dev.max()) / num_device_blocks,
            "host_usage_max": float(host.max()) / num_host_blocks if num_host_blocks else 0.0,
            **self._by_priority(r),
        }

    def _by_priority(self, r: dict[str, np.ndarray]) -> dict[str, Any]:
        """``{"by_priority": {p: {requests, ttft, e2e}}}``, most important first, when priorities differ."""
        prio = np.frombuffer(self.priority, dtype=np.int64) if len(self.priority) else np.zeros(0, np.int64)
        levels = np.unique(prio)
        if levels.size < 2:
            return {}
        return {
            "by_priority": {
                int(p): {
                    "requests": int((prio == p).sum()),
                    "ttft": dist(r["ttft"][prio == p]),
                    "e2e": dist(r["e2e"][prio == p]),
                }
                for p in levels[::-1]
            }
        }

    def timeline(self) -> dict[str, np.ndarray]:
        return {
            "time": np.frombuffer(self.t_time, dtype=np.float64),
            "device_blocks": np.frombuffer(self.t_device, dtype=np.int64),
            "host_blocks": np.frombuffer(self.t_host, dtype=np.int64),
            "batch": np.frombuffer(self.t_batch, dtype=np.int64),
            "tokens": np.frombuffer(self.t_tokens, dtype=np.int64),
            "replica": np.frombuffer(self.t_replica, dtype=np.int64),
        }
