"""PNG plots of simulated runs (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kvsched.sim.simulator import SimResult


def _plt():  # noqa: ANN202 - matplotlib is optional
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(results: Sequence[SimResult], path: str | Path) -> Path:
    """CDFs of TTFT, TPOT and end-to-end latency, one line per policy."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        per = r.recorder.per_request()
        data = {
            "TTFT (s)": per["ttft"],
            "TPOT (s)": per["tpot"][per["output_len"] > 1],
            "E2E (s)": per["e2e"],
        }
        for ax, (label, v) in zip(axes, data.items()):
            if v.size:
                x = np.sort(v)
                ax.plot(x, np.arange(1, x.size + 1) / x.size, label=r.name)
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def kv_usage(results: Sequence[SimResult], path: str | Path) -> Path:
    """Device and host blocks held by requests over virtual time (absolute: the oracle shows the need)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    for r in results:
        tl = r.recorder.timeline()
        axes[0].plot(tl["time"], tl["device_blocks"], label=r.name, lw=0.8)
        axes[1].plot(tl["time"], tl["host_blocks"], label=r.name, lw=0.8)
    axes[0].set_ylabel("device KV blocks held")
    axes[1].set_ylabel("host KV blocks held")
    axes[1].set_xlabel("virtual time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def rate_sweep(sweep: Mapping[str, Sequence[tuple[float, SimResult]]], path: str | Path) -> Path:
    """Throughput and goodput against offered request rate, one line per policy."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, points in sweep.items():
        rates = [p[0] for p in points]
        axes[0].plot(rates, [p[1].summary["request_throughput"] for p in points], marker="o", label=name)
        axes[1].plot(rates, [p[1].summary["goodput"] for p in points], marker="o", label=name)
    for ax, title in zip(axes, ("throughput (req/s)", "goodput (req/s)")):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:  # noqa: ANN001
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
