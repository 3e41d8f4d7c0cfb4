"""Multi-LoRA serving: HF PEFT adapters loaded from disk, applied per token group inside one forward."""

from kvsched.engine.lora.adapter import TARGET_MODULES, LoraAdapter, LoraAdapterError, load_adapter
from kvsched.engine.lora.layers import LoraContext, LoraLinear, install_lora
from kvsched.engine.lora.registry import LoraRegistry
from kvsched.engine.lora.residency import AdapterResidency

__all__ = [
    "AdapterResidency",
    "TARGET_MODULES",
    "LoraAdapter",
    "LoraAdapterError",
    "LoraContext",
    "LoraLinear",
    "LoraRegistry",
    "install_lora",
    "load_adapter",
]
