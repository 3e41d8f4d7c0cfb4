"""Reads one LoRA adapter in the HF PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT (https://github.com/huggingface/peft, ``tuners/lora``) stores, per adapted linear layer,
``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``; the layer computes
``base(x) + B(A(x)) * scaling`` with ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` when the
config sets ``use_rslora``. The scaling is folded into B here, once, so the forward multiplies twice.
Anything this loader cannot reproduce exactly (DoRA, per-module rank patterns, biases, extra trained
modules, fan-in/fan-out weights) is refused with a :class:`LoraAdapterError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvsched.core.errors import ConfigError
from kvsched.engine.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
#: The linear layers of a Llama-family block an adapter may target.
TARGET_MODULES = _ATTN + _MLP
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


class LoraAdapterError(ConfigError):
    """An adapter that cannot be loaded or does not fit the base model (the message says why)."""


@dataclass(slots=True)
class LoraAdapter:
    """One adapter's weights: ``weights[(layer, module)] = (A [r, in], B*scaling [out, r])``."""

    name: str
    path: Path
    rank: int
    scaling: float
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values()
        )


def module_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a target module in the base model."""
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.hidden_size, q_out),
        "k_proj": (cfg.hidden_size, kv_out),
        "v_proj": (cfg.hidden_size, kv_out),
        "o_proj": (q_out, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }[module]


def _read_config(name: str, path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise LoraAdapterError(
            f"LoRA adapter {name!r}: {file} is missing (need {CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LoraAdapterError(f"LoRA adapter {name!r}: {file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoraAdapterError(f"LoRA adapter {name!r}: {file} must hold a JSON object")
    return cfg


def _check_supported(name: str, cfg: dict[str, Any]) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraAdapterError(f"LoRA adapter {name!r}: peft_type={peft_type!r} is unsupported (only LORA)")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "bias": cfg.get("bias", "none") not in (None, "none"),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
    }
    for key, bad in unsupported.items():
        if bad:
            raise LoraAdapterError(f"LoRA adapter {name!r}: {key}={cfg[key]!r} is unsupported")


def _target_modules(name: str, cfg: dict[str, Any]) -> tuple[str, ...]:
    raw = cfg.get("target_modules")
    if isinstance(raw, str):  # PEFT: a string is a regex over full module names (or "all-linear")
        if raw == "all-linear":
            return TARGET_MODULES
        rx = re.compile(raw)
        found = tuple(
            m
            for m in TARGET_MODULES
            if any(rx.fullmatch(f"model.layers.0.{p}.{m}") for p in ("self_attn", "mlp"))
        )
        if not found:
            raise LoraAdapterError(
                f"LoRA adapter {name!r}: target_modules regex {raw!r} matches no supported module"
            )
        return found
    if not isinstance(raw, list) or not raw:
        raise LoraAdapterError(f"LoRA adapter {name!r}: target_modules={raw!r} must be a non-empty list")
    for m in raw:
        if m not in TARGET_MODULES:
            raise LoraAdapterError(
                f"LoRA adapter {name!r}: target module {m!r} is unsupported (supported: {', '.join(TARGET_MODULES)})"
            )
    return tuple(m for m in TARGET_MODULES if m in raw)


def load_adapter(
    name: str,
    path: str | Path,
    base: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoraAdapter:
    """Load and check one adapter against the base model's shapes."""
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise LoraAdapterError(f"LoRA adapter {name!r}: {root} is not a directory")
    cfg = _read_config(name, root)
    _check_supported(name, cfg)
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraAdapterError(f"LoRA adapter {name!r}: r={rank!r} must be an integer >= 1")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoraAdapterError(f"LoRA adapter {name!r}: lora_alpha={alpha!r} must be a number")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    targets = _target_modules(name, cfg)
    file = root / WEIGHTS_FILE
    if not file.is_file():
        raise LoraAdapterError(f"LoRA adapter {name!r}: {file} is missing")
    tensors = load_file(str(file))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoraAdapterError(f"LoRA adapter {name!r}: unexpected tensor {key!r} in {WEIGHTS_FILE}")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in TARGET_MODULES:
            raise LoraAdapterError(
                f"LoRA adapter {name!r}: tensor {key!r} targets unsupported module {module!r}"
            )
        if layer >= base.num_layers:
            raise LoraAdapterError(
                f"LoRA adapter {name!r}: tensor {key!r} is for layer {layer}, the base model has {base.num_layers}"
            )
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise LoraAdapterError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = module_shape(base, module)
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise LoraAdapterError(
                f"LoRA adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"rank {rank} on the base model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank})"
            )
        a = a.to(device=device, dtype=torch.float32)
        b = b.to(device=device, dtype=torch.float32) * scaling
        weights[(layer, module)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return LoraAdapter(name, root, rank, scaling, targets, weights)
