"""Engine configuration: one flat, validated dataclass that `LLM(**kwargs)` and the CLI both fill.

The KV pools may be sized in blocks or as byte budgets; bytes become blocks only once the model is
known (a block's size depends on layers, KV heads and head dim), in :meth:`EngineArgs.cache_config`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kvsched.core.config import CAPACITY_POLICIES, SCHEDULER_KINDS, CacheConfig, SchedulerConfig
from kvsched.core.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DEVICE_KV_BYTES = 1 << 30
#: Without a host size, the host tier matches the device pool, capped at this share of the memory
#: available now (TensorRT-LLM provisions a host tier by default so that suspension can happen).
DEFAULT_HOST_SHARE_OF_AVAILABLE_MEMORY = 0.25
#: Proposers of speculative decoding: prompt lookup, or a draft model with its own KV cache.
SPECULATIVE_KINDS = ("ngram", "draft")
#: Weight quantization applied after loading (engine/quant.py); None keeps the checkpoint's dtype.
QUANTIZATION_KINDS = ("int8", "int4")


def check_quantization(kind: str | None) -> None:
    """``kind`` is None or one of QUANTIZATION_KINDS (EngineArgs and ``quant.quantize_model`` both check)."""
    if kind is not None and kind not in QUANTIZATION_KINDS:
        raise ConfigError(
            f"quantization={kind!r} is invalid: must be None or one of {', '.join(QUANTIZATION_KINDS)}"
        )


@dataclass(slots=True)
class EngineArgs:
    """Everything the engine needs to start; ``model=None`` is the default SmolLM2 GGUF."""

    model: str | None = None
    dtype: str = "float32"
    # Opt-in weight quantization: "int8" (per output channel; decoder projections and LM head) or "int4"
    # (groups of 32, the GGUF Q4_1 layout; decoder projections, CPU). None: the checkpoint in ``dtype``.
    quantization: str | None = None
    device: str = "cpu"
    tokens_per_block: int = 16
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    device_kv_bytes: int | None = None
    host_kv_bytes: int | None = None
    enable_block_reuse: bool = True
    max_util_for_resume: float = 1.0
    scheduler: str = "unified"
    capacity_policy: str | None = None  # two-stage only; None = not given (two-stage: max_utilization)
    # Walk requests by higher Request.priority first (then arrival); evict the lowest priority first.
    priority_mode: bool = False
    max_batch_size: int = 64
    max_num_tokens: int | None = 2048
    chunk_unit_size: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    # Speculative decoding: None (off), "ngram" (prompt lookup) or "draft" (a draft model, see below).
    speculative: str | None = None
    num_speculative_tokens: int = 3
    # Draft model: a Llama-family checkpoint with the target's vocabulary; None = the target's first
    # draft_num_layers layers + its final norm and head (no extra download).
    draft_model: str | None = None
    draft_num_layers: int | None = None  # None: a quarter of the target's layers (at least 1)
    # Draft KV pool in bytes; None: the device budget is split so both caches get the same block count.
    draft_kv_bytes: int | None = None
    # Multi-LoRA: adapter name -> directory in the HF PEFT format (adapter_config.json +
    # adapter_model.safetensors); requests pick one by name or id (1, 2, ... in this order).
    lora_modules: Mapping[str, str] | None = None
    # Device budget of the PEFT cache in pages (None: every loaded adapter fits at once); one page holds
    # lora_page_bytes of adapter weights.
    max_lora_pages: int | None = None
    lora_page_bytes: int = 1 << 16
    # Build the engine LoRA-capable even without lora_modules, so adapters can be loaded at runtime
    # (Engine.load_lora_adapter; `kvsched serve --enable-lora-runtime-updates`).
    enable_lora: bool = False
    # Async scheduling (engine/overlap.py): the forward runs in a worker thread while the engine
    # schedules the next step and detokenizes the last one; outputs are the same as without it.
    async_scheduling: bool = False
    # Time each phase of a step (engine/step_profile.py; Engine.profile); synchronous loop only.
    profile_steps: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is invalid: must be one of {', '.join(_DTYPES)}")
        check_quantization(self.quantization)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} is invalid: must be 'cpu' or 'cuda[:N]'")
        if self.quantization == "int4" and self.device != "cpu":
            raise ConfigError(
                f"quantization='int4' runs on the CPU only (device={self.device!r}); use 'int8'"
            )
        if self.num_device_blocks is not None and self.device_kv_bytes is not None:
            raise ConfigError("give num_device_blocks or device_kv_bytes, not both")
        if self.num_host_blocks is not None and self.host_kv_bytes is not None:
            raise ConfigError("give num_host_blocks or host_kv_bytes, not both")
        for name in ("device_kv_bytes", "host_kv_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 0")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ConfigError(f"max_model_len={self.max_model_len!r} is invalid: must be an integer >= 2")
        self._validate_speculative()
        self._validate_lora()
        if not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"async_scheduling={self.async_scheduling!r} is invalid: must be a bool")
        if not isinstance(self.profile_steps, bool):
            raise ConfigError(f"profile_steps={self.profile_steps!r} is invalid: must be a bool")
        if self.profile_steps and (self.async_scheduling or self.speculative is not None):
            raise ConfigError(
                "profile_steps times the synchronous loop: not with async_scheduling or speculative"
            )
        if self.chunk_unit_size is not None and self.chunk_unit_size % self.tokens_per_block:
            raise ConfigError(
                f"chunk_unit_size={self.chunk_unit_size} is invalid: must be a multiple of "
                f"tokens_per_block={self.tokens_per_block}"
            )
        # The shared configs check the remaining fields (SchedulerConfig: scheduler kind, budgets and
        # capacity policy, the same rules make_scheduler applies) and name them in their errors.
        self.scheduler_config()
        self.cache_config(bytes_per_block=1)

    def _validate_speculative(self) -> None:
        if self.speculative is not None and self.speculative not in SPECULATIVE_KINDS:
            raise ConfigError(
                f"speculative={self.speculative!r} is invalid: must be None or one of {', '.join(SPECULATIVE_KINDS)}"
            )
        self._check_int("num_speculative_tokens", optional=False)
        self._check_int("draft_num_layers")
        if self.speculative != "draft":
            for name in ("draft_model", "draft_num_layers", "draft_kv_bytes"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is set but speculative={self.speculative!r} (needs 'draft')")
        if self.draft_model is not None and self.draft_num_layers is not None:
            raise ConfigError("give draft_model or draft_num_layers (a truncated target), not both")
        self._check_int("draft_kv_bytes")

    def _check_int(self, name: str, low: int = 1, optional: bool = True) -> None:
        """Field ``name`` is an int (a bool is not) >= ``low``; None passes where ``optional``."""
        v = getattr(self, name)
        if v is None and optional:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{name}={v!r} is invalid: must be an integer >= {low}")

    def _validate_lora(self) -> None:
        mods = self.lora_modules
        if not isinstance(self.enable_lora, bool):
            raise ConfigError(f"enable_lora={self.enable_lora!r} is invalid: must be a bool")
        if self.enable_lora and self.speculative is not None:
            raise ConfigError("enable_lora with speculative decoding is not supported yet")
        if mods is not None:
            if not isinstance(mods, Mapping):
                raise ConfigError(f"lora_modules={mods!r} is invalid: must be a mapping of name -> path")
            for name, path in mods.items():
                if not isinstance(name, str) or not name or not isinstance(path, str | os.PathLike):
                    raise ConfigError(f"lora_modules entry {name!r}: {path!r} is invalid: a name and a path")
            if mods and self.speculative is not None:
                raise ConfigError("lora_modules with speculative decoding is not supported yet")
        self._check_int("max_lora_pages", low=0)
        self._check_int("lora_page_bytes", optional=False)  # None refused: the field has an int default

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineArgs:
        """Build from `LLM(...)` keywords; an unknown keyword is a ConfigError that lists the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {unknown}; valid: {sorted(known)}")
        return cls(model=model, **kwargs)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            scheduler=self.scheduler,  # type: ignore[arg-type]
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            chunk_unit_size=self.chunk_unit_size,
            capacity_policy=self.capacity_policy,
            priority_mode=self.priority_mode,
        )

    def cache_config(self, bytes_per_block: int) -> CacheConfig:
        """Block counts per tier; byte budgets are divided by ``bytes_per_block`` (the model's)."""
        if bytes_per_block < 1:
            raise ConfigError(f"bytes_per_block must be >= 1, got {bytes_per_block}")
        device = self.num_device_blocks
        if device is None:
            budget = DEFAULT_DEVICE_KV_BYTES if self.device_kv_bytes is None else self.device_kv_bytes
            device = budget // bytes_per_block
            if device < 1:
                raise ConfigError(
                    f"device_kv_bytes={budget} is invalid: smaller than one KV block ({bytes_per_block} bytes)"
                )
        host = self.num_host_blocks
        if host is None:
            if self.host_kv_bytes is None:
                host = default_host_blocks(device, bytes_per_block)
            else:
                host = self.host_kv_bytes // bytes_per_block
        return CacheConfig(
            tokens_per_block=self.tokens_per_block,
            num_device_blocks=device,
            num_host_blocks=host,
            enable_block_reuse=self.enable_block_reuse,
            max_util_for_resume=self.max_util_for_resume,
        )


def available_memory_bytes() -> int | None:
    """Memory the OS could give us now (Linux ``MemAvailable``, else free pages), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_host_blocks(num_device_blocks: int, bytes_per_block: int) -> int:
    """The host tier when the user gave no size: as many blocks as the device pool, at most
    ``DEFAULT_HOST_SHARE_OF_AVAILABLE_MEMORY`` of the memory available now. Set 0 for none."""
    available = available_memory_bytes()
    if available is None:
        return num_device_blocks
    cap = int(available * DEFAULT_HOST_SHARE_OF_AVAILABLE_MEMORY) // bytes_per_block
    return max(0, min(num_device_blocks, cap))


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per EngineArgs field (defaults from the dataclass), for the CLIs."""
    group = parser.add_argument_group("engine")
    for f in fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "lora_modules":
            group.add_argument(
                flag,
                dest=f.name,
                nargs="+",
                type=parse_lora_module,
                default=None,
                metavar="NAME=PATH",
                help="LoRA adapters in the HF PEFT format; a request's model field (or lora_request) picks one",
            )
            continue
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        choices = {
            "scheduler": SCHEDULER_KINDS,
            "capacity_policy": CAPACITY_POLICIES,
            "speculative": SPECULATIVE_KINDS,
            "quantization": QUANTIZATION_KINDS,
        }
        helps = {
            "capacity_policy": "two-stage scheduler only (default max_utilization)",
            "speculative": "speculative decoding: ngram (prompt lookup) or draft (a draft model)",
            "quantization": "int8 (per channel) or int4 (groups of 32, CPU) weights (default: none, dtype)",
            "draft_model": "draft checkpoint with the target's vocabulary (default: a truncated target)",
        }
        group.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=default,
            choices=choices.get(f.name),
            help=helps.get(f.name, f"(default {default})"),
        )


def parse_lora_module(text: str) -> tuple[str, str]:
    """``name=path`` of ``--lora-modules``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, path


def engine_args_from_namespace(ns: argparse.Namespace) -> EngineArgs:
    values = {f.name: getattr(ns, f.name) for f in fields(EngineArgs)}
    if values.get("lora_modules") is not None:
        values["lora_modules"] = dict(values["lora_modules"])
    return EngineArgs(**values)
