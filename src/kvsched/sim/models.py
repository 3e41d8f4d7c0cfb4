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

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8": 1, "int8": 1, "int4": 0.5}


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
    weight_bytes: float = 2.0  # per parameter
    kv_bytes: float = 2.0  # per cached element
    fp8_compute: bool = False  # GEMMs run on FP8 tensor cores

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
        if self.weight_bytes <= 0 or self.kv_bytes <= 0:
            raise ConfigError(f"model {self.name!r}: weight_bytes and kv_bytes must be > 0")

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
        return self.num_params * self.weight_bytes

    @property
    def weight_bytes_per_step(self) -> float:
        """Bytes of weights one forward reads: all layers plus the LM head (embedding rows are gathered)."""
        return (
            self.num_layers * self.layer_params + self.embedding_params + self.hidden_size
        ) * self.weight_bytes

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


def model_from_hf_config(cfg: dict[str, Any], name: str | None = None, **overrides: Any) -> ModelSpec:
    """Read the fields of a HF `config.json` (Llama / Qwen2 / Mistral style)."""
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
    dtype = cfg.get("torch_dtype")
    if dtype in _DTYPE_BYTES:
        spec["weight_bytes"] = float(_DTYPE_BYTES[dtype])
        spec["kv_bytes"] = float(_DTYPE_BYTES[dtype])
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
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config {path}: invalid JSON ({exc})") from exc
    return model_from_hf_config(cfg, name=path.parent.name or path.stem, **overrides)
