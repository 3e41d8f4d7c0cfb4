"""Opt-in weight-only int8 linears (``quantization="int8"``), applied once after the weights are loaded.

Why: fp32 decode at batch 1 reads every weight once per token, so its speed is the memory bandwidth
divided by ~540 MB on SmolLM2-135M; int8 weights read a quarter of that. Each projection of every decoder
layer and the LM head become :class:`Int8Linear`: symmetric int8 per output channel (scale = the row's
max |w| / 127). The token embedding stays fp32 (a decode step reads one row of it, not the table).

Kernel, chosen by measurement (``benchmarks/decode.py``, torch 2.13 CPU): ``aten._weight_int8pack_mm``
with bf16 activations. Its fp32-activation variant was several times slower than fp32 ``linear``;
``torch._int_mm`` (int8 activations, quantized per token) was as fast but agreed less often with fp32;
``torch.ao.quantization.quantize_dynamic`` builds on quantized tensors, deprecated in torch 2.13.
The output is returned in the activation's dtype, so the rest of the model is unchanged. Off the CPU the
layer dequantizes its rows on the fly (correct, not fast): the int8 kernel is a CPU path.
"""

from __future__ import annotations

import torch
from torch import nn

from kvsched.core.errors import ConfigError
from kvsched.engine.engine_args import QUANTIZATION_KINDS

#: Projections of a decoder layer that are quantized (HF names; attention, then MLP).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (int8 [out, in], fp32 scale [out]) with ``weight ~ q * scale[:, None]``.

    Symmetric: the range is [-127, 127] (no -128), so ``-w`` quantizes to ``-q``. An all-zero row gets
    scale 1 (its codes are 0), never a division by zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """``x @ (q * scale[:, None]).T + bias`` with ``q`` int8 per output channel (see the module doc)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if scale.shape != (qweight.shape[0],):
            raise ValueError(f"scale must have shape ({qweight.shape[0]},), got {tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        # The kernel takes its scales in the activation dtype (bf16); the fp32 copy serves other devices.
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        q: torch.Tensor = self.qweight
        if q.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, self.scale_bf16).to(x.dtype)
        else:
            y = nn.functional.linear(flat, q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantize_model(model: nn.Module, quantization: str | None) -> int:
    """Replace the decoder projections and the LM head of ``model`` (a ``LlamaForCausalLM``) in place;
    returns how many linears were quantized. ``None`` leaves the model as it is (fp32 stays the default).
    A layer already quantized is skipped, so calling it twice is harmless. A tied LM head gets its own
    int8 copy; the embedding it was tied to stays fp32."""
    if quantization is None:
        return 0
    if quantization not in QUANTIZATION_KINDS:
        raise ConfigError(
            f"quantization={quantization!r} is invalid: must be None or one of {', '.join(QUANTIZATION_KINDS)}"
        )
    count = 0
    for layer in model.model.layers:  # type: ignore[union-attr]
        for parent, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                count += _replace(parent, name)
    count += _replace(model, "lm_head")
    return count


def _replace(parent: nn.Module, name: str) -> int:
    mod = getattr(parent, name)
    if isinstance(mod, Int8Linear):
        return 0
    if not isinstance(mod, nn.Linear):
        raise ConfigError(
            f"cannot quantize {name}: it is a {type(mod).__name__}, not a plain nn.Linear "
            "(quantize before installing LoRA adapters)"
        )
    setattr(parent, name, Int8Linear.from_linear(mod))
    return 1
