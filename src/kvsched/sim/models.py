"""Model presets from HF-style configs: the byte and FLOP counts the cost model needs.

Only decoder-only dense transformers with gated MLPs (Llama, Qwen2, Mistral, SmolLM) are modelled;
the counts are exact for those shapes, so a user's own `config.json` works as well as a preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.sim.quant import GEMM_DTYPES, override, read_precision


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """Shape of a decoder-only model and the precision of its weights and KV cache."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    weight_bytes: float = 2.0  # per parameter of the decoder layers
    kv_bytes: float = 2.0  # per cached element
    gemm_dtype: str = "bf16"  # tensor-core rate of the layers' GEMMs: bf16 | fp8 | fp4 (sim/quant.py)
    head_bytes: float | None = None  # per embedding / LM-head parameter (None: weight_bytes)

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"model {self.name!r}: {f}={v!r} is invalid: must be an integer > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if (
            self.weight_bytes <= 0
            or self.kv_bytes <= 0
            or (self.head_bytes is not None and self.head_bytes <= 0)
        ):
            raise ConfigError(f"model {self.name!r}: weight_bytes, head_bytes and kv_bytes must be > 0")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ConfigError(
                f"model {self.name!r}: gemm_dtype={self.gemm_dtype!r} is invalid: one of {GEMM_DTYPES}"
            )

    @property
    def fp8_compute(self) -> bool:
        """GEMMs run on FP8 (or narrower) tensor cores."""
        return self.gemm_dtype != "bf16"

    @property
    def head_gemm_dtype(self) -> str:
        """The LM head's GEMM rate: the layers' when it is quantized with them, else BF16."""
        return self.gemm_dtype if self.head_bytes is None else "bf16"

    @property
    def attn_dtype(self) -> str:
        """An FP8 KV cache is read by FP8 attention kernels (TensorRT-LLM's FP8 FMHA); else BF16."""
        return "fp8" if self.kv_bytes <= 1.0 else "bf16"

    @property
    def _head_bytes(self) -> float:
        return self.weight_bytes if self.head_bytes is None else self.head_bytes

    # -- parameter counts ---------------------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return q + kv + o + bias

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """All per-layer parameters (two RMSNorm vectors included)."""
        return self.attn_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + head + self.hidden_size

    @property
    def weight_bytes_total(self) -> float:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        layers = self.num_params - self.embedding_params - head
        return layers * self.weight_bytes + (self.embedding_params + head) * self._head_bytes

    @property
    def weight_bytes_per_step(self) -> float:
        """Bytes of weights one forward reads: all layers plus the LM head (embedding rows are gathered)."""
        layers = (self.num_layers * self.layer_params + self.hidden_size) * self.weight_bytes
        return layers + self.embedding_params * self._head_bytes

    # -- per-token figures ----------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token over all layers (the worked example: Llama-3-8B bf16 = 131,072 B)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes

    @property
    def linear_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through all layers (LM head excluded: only logit rows pay it)."""
        return 2.0 * self.num_layers * (self.attn_params_per_layer + self.mlp_params_per_layer)

    @property
    def lm_head_flops_per_token(self) -> float:
        return 2.0 * self.embedding_params

    @property
    def attn_flops_per_pair(self) -> float:
        """QK^T and PV FLOPs for one (query, key) pair over all layers and heads."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        """KV heads are split across `tp` GPUs (replicated when there are fewer heads than GPUs)."""
        heads = -(-self.num_kv_heads // tp)
        return 2 * self.num_layers * heads * self.head_dim * self.kv_bytes


def model_from_hf_config(
    cfg: dict[str, Any],
    name: str | None = None,
    *,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    **overrides: Any,
) -> ModelSpec:
    """Read the fields of a HF `config.json` (Llama / Qwen2 / Mistral style) and its precision
    (`torch_dtype`, `quantization_config`; `quantization` / `kv_cache_dtype` override them)."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        spec = {
            "name": name or cfg.get("_name_or_path") or cfg.get("model_type", "custom"),
            "num_layers": int(cfg["num_hidden_layers"]),
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or hidden // heads),
            "intermediate_size": int(cfg["intermediate_size"]),
            "vocab_size": int(cfg["vocab_size"]),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "attention_bias": bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        }
    except KeyError as exc:
        raise ConfigError(f"model config is missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model config has a non-numeric field: {exc}") from exc
    spec.update(override(read_precision(cfg), quantization, kv_cache_dtype).spec_fields())
    if "fp8_compute" in overrides:  # the older spelling of gemm_dtype="fp8"
        spec["gemm_dtype"] = "fp8" if overrides.pop("fp8_compute") else "bf16"
    spec.update(overrides)
    return ModelSpec(**spec)


_HF = {
    "llama-3.1-8b": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        model_type="llama",
        torch_dtype="bfloat16",
    ),
    "llama-3.1-70b": dict(
        num_hidden_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        tie_word_embeddings=False,
        model_type="llama",
        torch_dtype="bfloat16",
    ),
    "qwen2.5-7b": dict(
        num_hidden_layers=28,
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
        model_type="qwen2",
        torch_dtype="bfloat16",
    ),
    "mistral-7b": dict(  # v0.3
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        tie_word_embeddings=False,
        model_type="mistral",
        torch_dtype="bfloat16",
    ),
    "smollm2-135m": dict(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        model_type="llama",
        torch_dtype="bfloat16",
    ),
}

MODEL_PRESETS: dict[str, ModelSpec] = {k: model_from_hf_config(v, name=k) for k, v in _HF.items()}


def load_model(name_or_path: str, **overrides: Any) -> ModelSpec:
    """A preset by name (case-insensitive) or a HF `config.json` file (or a folder holding one)."""
    key = name_or_path.lower()
    if key in MODEL_PRESETS:
        base = _HF[key]
        return model_from_hf_config(base, name=key, **overrides) if overrides else MODEL_PRESETS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(
            f"unknown model {name_or_path!r}; presets: {sorted(MODEL_PRESETS)} or a HF config.json path"
        )
    cfg = _read_json(path)
    quant = path.parent / "hf_quant_config.json"  # ModelOpt exports write the precision here
    if "quantization_config" not in cfg and quant.exists():
        cfg["quantization_config"] = _read_json(quant)
    return model_from_hf_config(cfg, name=path.parent.name or path.stem, **overrides)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config {path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path}: a JSON object expected")
    return data
