"""Shape and hyper-parameters of a Llama-family decoder, read from an HF config or GGUF metadata.

One dataclass serves every loader so the model code never looks at a checkpoint format.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kvsched.core.errors import ConfigError
from kvsched.engine.weights.errors import UnsupportedModelError

# HF `architectures[0]` -> our family name. All three share the Llama block; they differ in biases
# (Qwen2: q/k/v) and the optional sliding window (Mistral).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp names; Mistral GGUFs say "llama"


@dataclass(slots=True)
class ModelConfig:
    """Everything the model code needs to build and run one decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_proj_bias: bool = False  # bias on the output projection (Llama attention_bias only)
    mlp_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name}={value!r} is invalid: must be an integer > 0")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads!r} is invalid: must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim!r} is invalid: must be even and > 0")
        if self.rope_theta <= 0:
            raise ConfigError(f"ModelConfig.rope_theta={self.rope_theta!r} is invalid: must be > 0")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 K+V bytes one token occupies over all layers (multiply by element size / 4 for others)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json`` (transformers 4.x or 5.x layout)."""
        archs = cfg.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch_name!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch_name]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModelError(f"unsupported RoPE scaling {rope_type!r} (only 'default')")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if family == "qwen2":
            if cfg.get("use_sliding_window", False):  # per-layer windows (max_window_layers): not modelled
                raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
            window = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=family,
            attention_bias=attention_bias or family == "qwen2",
            o_proj_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: Collection[str] = ()) -> ModelConfig:
        """Build from GGUF key/values (``general.architecture`` and ``<arch>.*`` keys); the tensor names
        tell whether the head is tied (no ``output.weight``) and which projections have biases."""
        arch = meta.get("general.architecture")
        if arch not in _GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {list(_GGUF_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{name}")
            return value

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(meta.get("tokenizer.ggml.tokens") or ())
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("rope.dimension_count", hidden // heads)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            architecture=arch,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            o_proj_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        )
