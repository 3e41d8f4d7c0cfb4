"""GPU presets for the roofline cost model: public peak figures, each with its own efficiency factor.

Peaks are dense (not sparse) and in decimal units (1 TB/s = 1e12 B/s). The efficiency factors are the
calibratable part; the peaks only change when the hardware does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kvsched.core.errors import ConfigError

TERA = 1e12
GIGA = 1e9


@dataclass(slots=True, frozen=True)
class GpuSpec:
    """One accelerator: peaks, sizes, links, and how much of each peak is reachable in practice."""

    name: str
    bf16_flops: float  # dense tensor FLOP/s
    fp8_flops: float  # dense tensor FLOP/s (= bf16 on GPUs without FP8)
    hbm_bandwidth: float  # B/s
    hbm_bytes: float
    host_link_bandwidth: float  # B/s per direction, theoretical
    gpu_link_bandwidth: float = 0.0  # B/s per direction between GPUs (tensor parallel all-reduce)
    fp4_flops: float = 0.0  # dense FP4 tensor FLOP/s (0 = no FP4 tensor cores: FP4 GEMMs at the FP8 rate)
    # Softmax exponentials per second (SMs x 16 MUFU ops per clock x boost clock; 0 = no ceiling): one
    # per (query, key) pair and head, so attention runs at most at this x 4 x head_dim FLOP/s whatever the
    # tensor-core rate (FlashAttention-4, together.ai/blog/flashattention-4: on B200 the exponential, not
    # the MMA, bounds attention; on Hopper FP8 attention stays tensor-bound).
    sfu_exp_rate: float = 0.0
    mfu: float = 0.6  # fraction of peak FLOP/s reached by GEMMs
    hbm_efficiency: float = 0.8  # fraction of HBM bandwidth reached by weight reads
    attention_efficiency: float = 0.5  # fraction of peaks reached by attention (KV reads, score FLOPs)
    host_link_efficiency: float = 0.87  # e.g. 55.6 of 64 GB/s measured pinned host-to-device
    gpu_link_efficiency: float = 0.7
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("bf16_flops", "fp8_flops", "hbm_bandwidth", "hbm_bytes", "host_link_bandwidth"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"gpu {self.name!r}: {f}={v!r} is invalid: must be a number > 0")
        for f in (
            "mfu",
            "hbm_efficiency",
            "attention_efficiency",
            "host_link_efficiency",
            "gpu_link_efficiency",
        ):
            v = getattr(self, f)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"gpu {self.name!r}: {f}={v!r} is invalid: must be in (0, 1]")
        if self.gpu_link_bandwidth < 0:
            raise ConfigError(f"gpu {self.name!r}: gpu_link_bandwidth must be >= 0")
        for f in ("fp4_flops", "sfu_exp_rate"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"gpu {self.name!r}: {f}={v!r} is invalid: must be a number >= 0")

    def gemm_flops(self, dtype: str) -> float:
        """Dense tensor peak for GEMMs in `dtype` (bf16 | fp8 | fp4); a narrower type than the GPU has
        runs at the narrowest rate it has."""
        if dtype == "fp4" and self.fp4_flops > 0:
            return self.fp4_flops
        if dtype in ("fp4", "fp8"):
            return self.fp8_flops
        if dtype == "bf16":
            return self.bf16_flops
        raise ConfigError(f"gemm dtype {dtype!r} is invalid: bf16, fp8 or fp4")

    def attention_flops(self, dtype: str, head_dim: int) -> float:
        """Peak FLOP/s of attention scores in `dtype`: the tensor-core rate, capped by the exponential
        units (4 x head_dim FLOPs of QK^T and PV per exponential)."""
        peak = self.gemm_flops(dtype)
        if self.sfu_exp_rate > 0:
            return min(peak, self.sfu_exp_rate * 4 * head_dim)
        return peak

    def with_efficiency(self, **factors: float) -> GpuSpec:
        """A copy with other efficiency factors (what a calibration changes)."""
        return replace(self, **factors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PCIE5 = 64 * GIGA  # x16, per direction
_PCIE4 = 32 * GIGA


def _exp_rate(sms: int, boost_ghz: float) -> float:
    """16 MUFU exponentials per clock per SM (Ampere through Blackwell; FlashAttention-4's analysis)."""
    return sms * 16 * boost_ghz * GIGA


_A100 = GpuSpec(
    "a100",
    sfu_exp_rate=_exp_rate(108, 1.41),
    bf16_flops=312 * TERA,
    fp8_flops=312 * TERA,  # no FP8 tensor cores: FP8 weights run at BF16 speed
    hbm_bandwidth=2.039 * TERA,
    hbm_bytes=80 * GIGA,
    host_link_bandwidth=_PCIE4,
    gpu_link_bandwidth=300 * GIGA,
    source="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS BF16 dense, 2,039 GB/s, NVLink 3 600 GB/s bidir, PCIe Gen4",
)

_H100 = GpuSpec(
    "h100",
    sfu_exp_rate=_exp_rate(132, 1.98),
    bf16_flops=989 * TERA,
    fp8_flops=1979 * TERA,
    hbm_bandwidth=3.35 * TERA,
    hbm_bytes=80 * GIGA,
    host_link_bandwidth=_PCIE5,
    gpu_link_bandwidth=450 * GIGA,
    source="glennklockwood.com/garden/processors/h100 (H100 SXM): BF16 989.4, FP8 1978.9 dense, 3.35 TB/s, NVLink 4, PCIe Gen5",
)

GPU_PRESETS: dict[str, GpuSpec] = {
    "a100": _A100,
    # The same chip with 40 GB of HBM2: only the memory differs.
    "a100-40gb": replace(
        _A100,
        name="a100-40gb",
        hbm_bandwidth=1.555 * TERA,
        hbm_bytes=40 * GIGA,
        source="NVIDIA A100 datasheet (SXM4 40GB): 312 TFLOPS BF16 dense, 1,555 GB/s HBM2, NVLink 3, PCIe Gen4",
    ),
    "h100": _H100,
    # The same die as the H100 with more and faster HBM (141 GB HBM3e).
    "h200": replace(
        _H100,
        name="h200",
        hbm_bandwidth=4.8 * TERA,
        hbm_bytes=141 * GIGA,
        source="MLCommons v4.1 H200-SXM-141GBx8 + NVIDIA H200 spec page (via morphllm.com): 141 GB, 4.8 TB/s, same die as H100",
    ),
    "b200": GpuSpec(
        "b200",
        sfu_exp_rate=_exp_rate(148, 1.965),
        bf16_flops=2250 * TERA,
        fp8_flops=4500 * TERA,
        fp4_flops=9000 * TERA,
        hbm_bandwidth=8.0 * TERA,
        hbm_bytes=180 * GIGA,
        host_link_bandwidth=_PCIE5,
        gpu_link_bandwidth=900 * GIGA,
        source="glennklockwood.com/garden/processors/B200 (HGX 1000 W) + MLCommons v6.0 B200-SXM-180GB: PCIe Gen5 x16",
    ),
    "l40s": GpuSpec(
        "l40s",
        sfu_exp_rate=_exp_rate(142, 2.52),
        bf16_flops=362 * TERA,
        fp8_flops=733 * TERA,
        hbm_bandwidth=0.864 * TERA,
        hbm_bytes=48 * GIGA,
        host_link_bandwidth=_PCIE4,
        gpu_link_bandwidth=_PCIE4,  # no NVLink: all-reduce over PCIe
        source="NVIDIA L40S datasheet: 362 TFLOPS BF16 / 733 FP8 dense (half the sparse figures), 864 GB/s GDDR6, PCIe Gen4 x16",
    ),
}


def gpu_from_dict(data: dict[str, Any]) -> GpuSpec:
    """Build a GpuSpec from a user's dict; peaks may be given as `*_tflops` / `*_tbps` / `*_gbps` / `*_gb`."""
    d = dict(data)
    units = {
        "bf16_tflops": ("bf16_flops", TERA),
        "fp8_tflops": ("fp8_flops", TERA),
        "fp4_tflops": ("fp4_flops", TERA),
        "hbm_tbps": ("hbm_bandwidth", TERA),
        "hbm_gb": ("hbm_bytes", GIGA),
        "host_link_gbps": ("host_link_bandwidth", GIGA),
        "gpu_link_gbps": ("gpu_link_bandwidth", GIGA),
    }
    for key, (name, scale) in units.items():
        if key in d:
            d[name] = float(d.pop(key)) * scale
    d.setdefault("name", "custom")
    if "fp8_flops" not in d and "bf16_flops" in d:
        d["fp8_flops"] = d["bf16_flops"]
    known = {f.name for f in fields(GpuSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"gpu spec: unknown fields {unknown}; known: {sorted(known)}")
    try:
        return GpuSpec(**d)
    except TypeError as exc:
        raise ConfigError(f"gpu spec: {exc}") from exc


def load_gpu(name_or_path: str) -> GpuSpec:
    """A preset by name (case-insensitive) or a JSON file with GpuSpec fields."""
    key = name_or_path.lower()
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ConfigError(f"gpu spec file {path} does not exist")
        try:
            return gpu_from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"gpu spec file {path}: invalid JSON ({exc})") from exc
    raise ConfigError(f"unknown gpu {name_or_path!r}; presets: {sorted(GPU_PRESETS)} or a .json file")
