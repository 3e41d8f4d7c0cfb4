"""LoRA adapter shape for the cost model: FLOPs per token and bytes per adapter of the wrapped linears.

A rank-r adapter on a linear d_in -> d_out adds A (r x d_in) and B (d_out x r): r * (d_in + d_out)
parameters, 2 * r * (d_in + d_out) FLOPs per token, per wrapped linear per layer (HF PEFT's LoRA layout,
the format the engine loads; see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsched.core.errors import ConfigError
from kvsched.sim.models import ModelSpec

#: the linears an adapter may wrap (HF PEFT target module names of Llama-style models, short forms)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _dims(model: ModelSpec, target: str) -> tuple[int, int]:
    """(d_in, d_out) of one wrapped linear."""
    h, q, kv, i = (
        model.hidden_size,
        model.num_heads * model.head_dim,
        model.num_kv_heads * model.head_dim,
        (model.intermediate_size),
    )
    return {
        "q": (h, q),
        "k": (h, kv),
        "v": (h, kv),
        "o": (q, h),
        "gate": (h, i),
        "up": (h, i),
        "down": (i, h),
    }[target]


@dataclass(slots=True, frozen=True)
class LoraSpec:
    """Rank, wrapped linears and weight precision of the adapters (all adapters alike)."""

    rank: int = 16
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    weight_bytes: float = 2.0  # per adapter parameter (BF16)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora rank={self.rank!r} is invalid: must be an integer > 0")
        if not self.targets:
            raise ConfigError("lora targets are empty: name at least one of " + ",".join(LORA_TARGETS))
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"lora targets {bad} are invalid: each one of {','.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets {self.targets} name a module twice")
        if self.weight_bytes <= 0:
            raise ConfigError(f"lora weight_bytes={self.weight_bytes!r} must be > 0")

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        """`q,k,v,o` (or HF names like `q_proj`) -> short names."""
        names = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(t[: -len("_proj")] if t.endswith("_proj") else t for t in names)

    def params_per_layer(self, model: ModelSpec) -> int:
        """Adapter parameters in one decoder layer: r * (d_in + d_out) summed over the wrapped linears."""
        return sum(self.rank * sum(_dims(model, t)) for t in self.targets)

    def flops_per_token(self, model: ModelSpec) -> float:
        """Extra FLOPs of one token through one adapter (all layers): 2 * r * (d_in + d_out) per linear."""
        return 2.0 * self.params_per_layer(model) * model.num_layers

    def adapter_bytes(self, model: ModelSpec) -> float:
        """Bytes of one adapter (all layers): what a step reads once and a load copies host -> device."""
        return self.params_per_layer(model) * model.num_layers * self.weight_bytes
