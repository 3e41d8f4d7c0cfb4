"""HF checkpoint folders: ``config.json`` + ``*.safetensors`` (one file or shards)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.common import empty_model, fill_parameters, parameter_names
from kvsched.engine.weights.errors import ModelLoadError, ModelNotFoundError


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    return ModelConfig.from_hf_config(raw)


def load_hf_folder(
    folder: Path, *, dtype: torch.dtype, device: str | torch.device
) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = read_hf_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder}: no *.safetensors file")
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
    model = empty_model(config, dtype, device)

    def fetch(name: str) -> torch.Tensor | None:
        handle = where.get(name)
        return None if handle is None else handle.get_tensor(name)

    fill_parameters(model, parameter_names(model), fetch, str(folder))
    return model, config
