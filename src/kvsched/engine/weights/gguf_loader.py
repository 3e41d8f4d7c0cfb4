"""GGUF checkpoints (llama.cpp layout), dequantized to float at load.

llama.cpp stores a llama model's ``attn_q``/``attn_k`` with rows permuted for its interleaved RoPE; we
undo that (``unpermute``, the inverse of ``permute`` in llama.cpp's ``convert_hf_to_gguf.py``) so the
weights equal HF's rotate-half layout.
Qwen2 files keep HF's layout (llama.cpp runs them with NEOX-style RoPE) and carry q/k/v biases.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from kvsched.engine.model.llama import LlamaForCausalLM
from kvsched.engine.model_config import ModelConfig
from kvsched.engine.weights.common import empty_model, fill_parameters, parameter_names
from kvsched.engine.weights.gguf_file import GGUFFile

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (works for weights [rows, cols] and biases [rows])."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def load_gguf(
    path: Path, *, dtype: torch.dtype, device: str | torch.device
) -> tuple[LlamaForCausalLM, ModelConfig, dict[str, Any]]:
    """Returns the model, its config and the raw metadata (the tokenizer is built from it)."""
    gf = GGUFFile(path)
    config = ModelConfig.from_gguf_metadata(gf.metadata, gf.tensors.keys())
    by_hf = {name: t for t in gf.tensors if (name := hf_name(t)) is not None}
    model = empty_model(config, dtype, device)
    permuted = (
        config.architecture == "llama"
    )  # llama.cpp permutes Q/K rows for llama only (NEOX RoPE elsewhere)

    def fetch(name: str) -> torch.Tensor | None:
        gname = by_hf.get(name)
        if gname is None:
            return None
        w = gf.tensor(gname)
        if not permuted:
            return w
        if ".q_proj." in name:
            w = unpermute(w, config.num_heads)
        elif ".k_proj." in name:
            w = unpermute(w, config.num_kv_heads)
        return w

    fill_parameters(model, parameter_names(model), fetch, str(path))
    return model, config, gf.metadata
