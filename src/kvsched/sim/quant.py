"""Precision of a model's weights, GEMMs and KV cache, read from HF-style configs or given by flags.

A quantized checkpoint changes three things the cost model sees: bytes per weight (what a decode step
reads), the tensor-core rate of its GEMMs (FP8 / FP4 peaks where the GPU has them) and bytes per cached
KV element (what the block pool holds and attention reads). Formats read:

- ModelOpt (`quant_method: modelopt` in `quantization_config`, or the `quantization` section of
  `hf_quant_config.json`): `quant_algo` FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_BLOCK_SCALES / NVFP4 /
  W4A16_AWQ, `kv_cache_quant_algo` FP8 / NVFP4. ModelOpt leaves the embedding and LM head unquantized.
- compressed-tensors (`config_groups` weights / input_activations, `kv_cache_scheme`).
- HF `quant_method: fp8` (block-wise FP8 weights, dynamic FP8 activations); AWQ / GPTQ (`bits`).
- `torch_dtype` (or `dtype`): float32, float16, bfloat16, and float8 (everything in FP8).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvsched.core.errors import ConfigError

GEMM_DTYPES = ("bf16", "fp8", "fp4")


@dataclass(slots=True, frozen=True)
class WeightFormat:
    """How quantized linear weights are stored and which tensor-core rate their GEMMs run at."""

    bytes_per_param: float  # block scales included
    gemm_dtype: str  # one of GEMM_DTYPES


# NVFP4: 4-bit values plus one FP8 scale per 16 (ModelOpt's group size); AWQ/GPTQ int4 with a 16-bit
# scale per 128 weights, dequantized into BF16 GEMMs (W4A16); int8 weight-only likewise (W8A16).
WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "bf16": WeightFormat(2.0, "bf16"),
    "fp16": WeightFormat(2.0, "bf16"),
    "fp32": WeightFormat(4.0, "bf16"),
    "fp8": WeightFormat(1.0, "fp8"),
    "nvfp4": WeightFormat(0.5 + 1 / 16, "fp4"),
    "int8": WeightFormat(1.0, "bf16"),
    "int4": WeightFormat(0.5 + 2 / 128, "bf16"),
}
KV_FORMATS: dict[str, float] = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}

_TORCH_DTYPES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "fp8": "fp8",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "int8": "int8",
    "int4": "int4",
}
_MODELOPT_ALGOS = {
    "FP8": "fp8",
    "FP8_PER_CHANNEL_PER_TOKEN": "fp8",
    "FP8_BLOCK_SCALES": "fp8",
    "NVFP4": "nvfp4",
    "W4A16_AWQ": "int4",
    "W4A8_AWQ": "int4",
}
_MODELOPT_KV = {"FP8": "fp8", "NVFP4": "nvfp4"}


@dataclass(slots=True, frozen=True)
class Precision:
    """What a config says: `None` = not stated (the base dtype applies)."""

    base: str | None = None  # torch_dtype: activations, unquantized weights, KV by default
    weights: str | None = None  # quantized linear layers
    kv: str | None = None
    quantize_head: bool = False  # embedding and LM head quantized too (a float8 torch_dtype)

    def spec_fields(self) -> dict[str, Any]:
        """ModelSpec fields: weight_bytes, head_bytes, kv_bytes, gemm_dtype."""
        base = self.base or "bf16"
        wfmt = WEIGHT_FORMATS[self.weights or base]
        head = wfmt.bytes_per_param if self.quantize_head else WEIGHT_FORMATS[base].bytes_per_param
        kv = KV_FORMATS[self.kv or ("fp8" if base == "fp8" else base if base in KV_FORMATS else "bf16")]
        return {
            "weight_bytes": wfmt.bytes_per_param,
            "head_bytes": head,
            "kv_bytes": kv,
            "gemm_dtype": wfmt.gemm_dtype,
        }


def _torch_dtype(cfg: Mapping[str, Any]) -> str | None:
    raw = cfg.get("torch_dtype", cfg.get("dtype"))
    if raw is None:
        return None
    key = str(raw).lower().removeprefix("torch.")
    if key not in _TORCH_DTYPES:
        raise ConfigError(
            f"model config: torch_dtype {raw!r} is not supported; one of {sorted(_TORCH_DTYPES)}"
        )
    return _TORCH_DTYPES[key]


def _modelopt(qc: Mapping[str, Any]) -> tuple[str | None, str | None]:
    algo, kv = qc.get("quant_algo"), qc.get("kv_cache_quant_algo")
    if algo is not None and str(algo).upper() not in _MODELOPT_ALGOS:
        raise ConfigError(
            f"quantization_config: ModelOpt quant_algo {algo!r} is not modelled; one of {sorted(_MODELOPT_ALGOS)}"
        )
    if kv is not None and str(kv).upper() not in _MODELOPT_KV:
        raise ConfigError(
            f"quantization_config: kv_cache_quant_algo {kv!r} is not modelled; one of {sorted(_MODELOPT_KV)}"
        )
    return (
        None if algo is None else _MODELOPT_ALGOS[str(algo).upper()],
        None if kv is None else _MODELOPT_KV[str(kv).upper()],
    )


def _ct_scheme(scheme: Mapping[str, Any] | None, what: str) -> str | None:
    """A compressed-tensors tensor scheme -> a format name (None when absent)."""
    if not scheme:
        return None
    bits, kind = scheme.get("num_bits"), str(scheme.get("type", "int")).lower()
    if kind == "float" and bits == 8:
        return "fp8"
    if kind == "float" and bits == 4:
        return "nvfp4"
    if kind == "int" and bits in (4, 8):
        return f"int{bits}"
    raise ConfigError(f"quantization_config: compressed-tensors {what} {bits}-bit {kind} is not modelled")


def _compressed_tensors(qc: Mapping[str, Any]) -> tuple[str | None, str | None]:
    weights = acts = None
    for group in (qc.get("config_groups") or {}).values():
        weights = _ct_scheme(group.get("weights"), "weights") or weights
        acts = _ct_scheme(group.get("input_activations"), "input_activations") or acts
    if weights in ("fp8", "int8") and acts is None:
        weights = "int8"  # weight-only 8-bit: dequantized into BF16 GEMMs
    elif weights == "int8" and acts == "int8":
        weights = "int8"  # W8A8 int8 is not modelled separately: its bytes are right, its rate is BF16's
    return weights, _ct_scheme(qc.get("kv_cache_scheme"), "kv_cache_scheme")


def read_precision(cfg: Mapping[str, Any]) -> Precision:
    """The precision a HF `config.json` (optionally merged with `hf_quant_config.json`) states."""
    base = _torch_dtype(cfg)
    qc = cfg.get("quantization_config") or cfg.get("quantization")
    if base == "fp8" and not qc:
        return Precision(base="bf16", weights="fp8", kv="fp8", quantize_head=True)
    if not qc:
        return Precision(base=base)
    if not isinstance(qc, Mapping):
        raise ConfigError(f"quantization_config must be an object, got {type(qc).__name__}")
    if isinstance(qc.get("quantization"), Mapping):  # hf_quant_config.json shape: {"quantization": {...}}
        qc = qc["quantization"]
    method = str(qc.get("quant_method", "modelopt" if "quant_algo" in qc else "")).lower()
    base = None if base == "fp8" else base
    if method == "modelopt":
        weights, kv = _modelopt(qc)
    elif method == "compressed-tensors":
        weights, kv = _compressed_tensors(qc)
    elif method == "fp8":
        weights, kv = "fp8", None
    elif method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit"))
        if bits not in (4, 8):
            raise ConfigError(f"quantization_config: {method} with bits={bits!r} is not modelled (4 or 8)")
        weights, kv = f"int{bits}", None
    else:
        raise ConfigError(
            f"quantization_config: quant_method {method!r} is not modelled; "
            "one of modelopt, compressed-tensors, fp8, awq, gptq"
        )
    return Precision(base=base, weights=weights, kv=kv)


def override(p: Precision, quantization: str | None = None, kv_cache_dtype: str | None = None) -> Precision:
    """Apply `--quantization` / `--kv-cache-dtype` (None or "auto" keeps what the config says)."""
    w, kv, head = p.weights, p.kv, p.quantize_head
    if quantization not in (None, "auto"):
        q = "bf16" if quantization == "none" else quantization
        if q not in WEIGHT_FORMATS:
            raise ConfigError(
                f"quantization {quantization!r} is invalid: auto, none or one of {sorted(WEIGHT_FORMATS)}"
            )
        w, head = q, False
    if kv_cache_dtype not in (None, "auto"):
        if kv_cache_dtype not in KV_FORMATS:
            raise ConfigError(
                f"kv_cache_dtype {kv_cache_dtype!r} is invalid: auto or one of {sorted(KV_FORMATS)}"
            )
        kv = kv_cache_dtype
    return Precision(base=p.base, weights=w, kv=kv, quantize_head=head)
